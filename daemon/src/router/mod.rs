//! The router: answers chat requests on the device, and when the model asks for help (the help
//! marker at the end of its reasoning) takes the request to the cloud under the budget, or
//! answers locally with the marker forbidden. The model it serves can be swapped while serving
//! ([`LiveModel`]).

mod budget_journal;
mod budget_store;
mod chat_template;
mod engine_worker;
mod routing;
mod serving_model;

pub use budget_store::{BudgetStore, BudgetStoreError, now_ms};
pub use chat_template::{ChatTemplate, TemplateError};
pub use engine_worker::{EngineWorker, LoadedModel, LocalGeneration, Prompt};
pub use routing::{CloudOffload, EventSink, Router, RouterSettings};
pub use serving_model::{LiveModel, ServingModel, ServingModelError};
