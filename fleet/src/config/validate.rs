//! Checks that a parsed configuration can run, with errors that say what to change.

use super::{ClientAuth, FleetConfig, MqttMode};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("store.url `{0}` is neither sqlite://PATH nor postgres://…")]
    StoreUrl(String),
    #[error("store.max_connections must be at least 1")]
    MaxConnections,
    #[error("ingest.{0} must be at least 1")]
    IngestZero(&'static str),
    #[error("mqtt.mode = \"external\" needs an [mqtt.external] section with its url")]
    ExternalMissing,
    #[error("mqtt.external.url `{0}` is neither mqtt://HOST:PORT nor mqtts://HOST:PORT")]
    ExternalUrl(String),
    #[error("mqtt.external.receive_maximum must be at least 1")]
    ExternalReceiveMaximum,
    #[error("mqtt.embedded needs `listen` or `tls_listen`")]
    NoListener,
    #[error("mqtt.embedded.tls_listen needs a [mqtt.embedded.tls] section with cert_file and key_file")]
    TlsMissing,
    #[error("mqtt.embedded.tls.client_auth = \"{0}\" needs client_ca_file")]
    ClientCaMissing(&'static str),
    #[error(
        "the embedded broker has neither a devices_file nor mqtt.embedded.allow_anonymous = true: no device \
         could connect"
    )]
    NoDevices,
    #[error("mqtt.embedded.receive_maximum must be at least 1")]
    ReceiveMaximum,
    #[error("mqtt.embedded.max_packet_bytes must be at least 1024")]
    MaxPacket,
    #[error("gateway.{field}: {reason}")]
    Gateway { field: &'static str, reason: String },
    #[error("registry.trusted_keys is empty: the registry only accepts bundles signed by a trusted key")]
    NoTrustedKeys,
    #[error("registry.public_url `{0}` is neither http://… nor https://…")]
    PublicUrl(String),
    #[error(
        "registry.public_url `{0}` is plain http, but [api.tls] makes the API answer HTTPS only: devices \
         could not download bundles; use https://…"
    )]
    PublicUrlNotHttps(String),
    #[error("api.tls.{0} is empty: set the PEM file's path")]
    ApiTlsPath(&'static str),
    #[error("registry: {0}")]
    RegistryStore(String),
    #[error("rollouts.evaluate_interval_ms must be at least 10")]
    EvaluateInterval,
    #[error("scheduler.{0}")]
    Scheduler(String),
}

impl FleetConfig {
    /// Every problem found, or `Ok` when the configuration can run.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errors = Vec::new();
        let url = self.store.url.as_str();
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            errors.push(ValidationError::StoreUrl(self.store.url.clone()));
        }
        if self.store.max_connections == 0 {
            errors.push(ValidationError::MaxConnections);
        }
        for (name, value) in [
            ("max_batch_events", self.ingest.max_batch_events),
            ("queue_messages", self.ingest.queue_messages),
            ("max_message_bytes", self.ingest.max_message_bytes),
        ] {
            if value == 0 {
                errors.push(ValidationError::IngestZero(name));
            }
        }
        match self.mqtt.mode {
            MqttMode::External => match &self.mqtt.external {
                None => errors.push(ValidationError::ExternalMissing),
                Some(external) => {
                    if !(external.url.starts_with("mqtt://") || external.url.starts_with("mqtts://")) {
                        errors.push(ValidationError::ExternalUrl(external.url.clone()));
                    }
                    if external.receive_maximum == 0 {
                        errors.push(ValidationError::ExternalReceiveMaximum);
                    }
                }
            },
            MqttMode::Embedded => {
                let broker = &self.mqtt.embedded;
                if broker.listen.is_none() && broker.tls_listen.is_none() {
                    errors.push(ValidationError::NoListener);
                }
                if broker.tls_listen.is_some() && broker.tls.is_none() {
                    errors.push(ValidationError::TlsMissing);
                }
                if let Some(tls) = &broker.tls
                    && tls.client_ca_file.is_none()
                {
                    match tls.client_auth {
                        ClientAuth::None => {}
                        ClientAuth::Optional => errors.push(ValidationError::ClientCaMissing("optional")),
                        ClientAuth::Required => errors.push(ValidationError::ClientCaMissing("required")),
                    }
                }
                if self.devices_file.is_none() && !broker.allow_anonymous {
                    errors.push(ValidationError::NoDevices);
                }
                if broker.receive_maximum == 0 {
                    errors.push(ValidationError::ReceiveMaximum);
                }
                if broker.max_packet_bytes < 1024 {
                    errors.push(ValidationError::MaxPacket);
                }
            }
        }
        if let Some(tls) = &self.api.tls {
            for (key, path) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if path.as_os_str().is_empty() {
                    errors.push(ValidationError::ApiTlsPath(key));
                }
            }
        }
        let gateway = &self.gateway;
        for (field, policy) in
            [("device_budget", &gateway.device_budget), ("fleet_budget", &gateway.fleet_budget)]
        {
            if let Err(error) = policy.validate() {
                errors.push(ValidationError::Gateway { field, reason: error.to_string() });
            }
        }
        if gateway.max_in_flight == 0 {
            errors.push(ValidationError::Gateway {
                field: "max_in_flight",
                reason: "must be at least 1".into(),
            });
        }
        for (i, upstream) in gateway.upstream.iter().enumerate() {
            if let Err(error) = tandemd::offload::completions_url(&upstream.url) {
                errors.push(ValidationError::Gateway {
                    field: "upstream",
                    reason: format!("#{}: {error}", i + 1),
                });
            }
        }
        if let Some(registry) = &self.registry {
            if registry.trusted_keys.is_empty() {
                errors.push(ValidationError::NoTrustedKeys);
            }
            if let Some(url) = &registry.public_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                errors.push(ValidationError::PublicUrl(url.clone()));
            }
            if let Some(url) = &registry.public_url
                && self.api.tls.is_some()
                && url.starts_with("http://")
            {
                errors.push(ValidationError::PublicUrlNotHttps(url.clone()));
            }
            errors.extend(
                registry_store_problems(registry, self.registry_s3.as_ref())
                    .into_iter()
                    .map(ValidationError::RegistryStore),
            );
        } else if self.registry_s3.is_some() {
            errors.push(ValidationError::RegistryStore("[registry_s3] needs a [registry] section".into()));
        }
        if self.rollouts.evaluate_interval_ms < 10 {
            errors.push(ValidationError::EvaluateInterval);
        }
        if let Some(scheduler) = &self.scheduler {
            errors.extend(self.scheduler_problems(scheduler).into_iter().map(ValidationError::Scheduler));
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn scheduler_problems(&self, scheduler: &super::SchedulerConfig) -> Vec<String> {
        let mut problems = Vec::new();
        if scheduler.runner == super::RunnerKind::Command
            && !scheduler.command_template.as_deref().is_some_and(|t| t.contains("{command}"))
        {
            problems.push("runner = \"command\" needs a command_template with {command}".into());
        }
        if scheduler.evaluate_interval_secs == 0 {
            problems.push("evaluate_interval_secs must be at least 1".into());
        }
        if scheduler.register && self.registry.is_none() {
            problems.push("register = true needs a [registry] (or set register = false)".into());
        }
        if scheduler.rollout && !scheduler.register {
            problems.push("rollout = true needs register = true".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for template in &scheduler.template {
            let name = &template.name;
            if name.is_empty() || !names.insert(name.as_str()) {
                problems.push(format!("template `{name}`: names must be non-empty and unique"));
            }
            if template.commands.is_empty() && template.signing_key.is_none() {
                problems.push(format!(
                    "template `{name}`: the default commands sign the bundle: set signing_key, or commands"
                ));
            }
            if template.every_hours.is_some_and(|h| h.is_nan() || h <= 0.0) {
                problems.push(format!("template `{name}`: every_hours must be above 0"));
            }
            if let Some(rule) = &template.call_ratio
                && !(0.0 <= rule.low && rule.low <= rule.high && rule.high <= 1.0)
            {
                problems.push(format!("template `{name}`: call_ratio needs 0 <= low <= high <= 1"));
            }
        }
        problems
    }
}

/// Where the registry keeps bundles: exactly one of `registry.dir` and `[registry_s3]`, usable.
fn registry_store_problems(
    registry: &super::RegistryConfig,
    s3: Option<&super::S3StoreConfig>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let has_dir = !registry.dir.as_os_str().is_empty();
    let Some(s3) = s3 else {
        if !has_dir {
            problems.push("set `dir` (bundles on this host) or a [registry_s3] section".into());
        }
        return problems;
    };
    if has_dir {
        problems.push("set either registry.dir or [registry_s3], not both".into());
    }
    if s3.bucket.is_empty() {
        problems.push("registry_s3.bucket is empty".into());
    }
    if let Some(endpoint) = &s3.endpoint {
        if endpoint.starts_with("http://") && !s3.allow_http {
            problems.push(format!(
                "registry_s3.endpoint `{endpoint}` is plain http: use https, or set registry_s3.allow_http = true for a store on loopback"
            ));
        } else if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            problems.push(format!("registry_s3.endpoint `{endpoint}` is neither http://… nor https://…"));
        }
    }
    if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
        problems.push("registry_s3.access_key_id and registry_s3.secret_access_key go together".into());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_config;

    #[test]
    fn the_defaults_need_a_devices_file_or_anonymous_access() {
        let errors = FleetConfig::default().validate().unwrap_err();
        assert_eq!(errors, vec![ValidationError::NoDevices]);
        let config = parse_config("[mqtt.embedded]\nallow_anonymous = true\n").unwrap();
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let config = parse_config(
            "[store]\nurl = \"mysql://x\"\n[mqtt]\nmode = \"external\"\n[gateway.device_budget]\ncloud_fraction = 1.5\n",
        )
        .unwrap();
        let errors = config.validate().unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.contains(&ValidationError::ExternalMissing));
    }

    #[test]
    fn the_registry_needs_a_trusted_key_and_an_http_public_url() {
        let config = parse_config(
            "[mqtt.embedded]\nallow_anonymous = true\n[registry]\ndir = \"/r\"\ntrusted_keys = []\npublic_url = \"ftp://x\"\n",
        )
        .unwrap();
        assert_eq!(
            config.validate().unwrap_err(),
            vec![ValidationError::NoTrustedKeys, ValidationError::PublicUrl("ftp://x".into())]
        );
    }

    #[test]
    fn an_https_api_needs_both_pem_paths_and_an_https_public_url() {
        let base =
            "[mqtt.embedded]\nallow_anonymous = true\n[registry]\ndir = \"/r\"\ntrusted_keys = [\"k.pub\"]\n";
        let config = |extra: &str| parse_config(&format!("{base}{extra}")).unwrap();
        let tls = "[api.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n";
        assert_eq!(config(tls).validate(), Ok(()));
        assert_eq!(config(&format!("public_url = \"https://fleet:8780\"\n{tls}")).validate(), Ok(()));
        assert_eq!(
            config(&format!("public_url = \"http://fleet:8780\"\n{tls}")).validate().unwrap_err(),
            vec![ValidationError::PublicUrlNotHttps("http://fleet:8780".into())]
        );
        assert_eq!(
            config("[api.tls]\ncert_file = \"\"\nkey_file = \"/k.pem\"\n").validate().unwrap_err(),
            vec![ValidationError::ApiTlsPath("cert_file")]
        );
        assert!(parse_config("[api.tls]\ncert_file = \"/c\"\nkey = \"/k\"\n").is_err(), "typos are refused");
    }

    #[test]
    fn the_registry_keeps_bundles_in_one_usable_place() {
        let base = "[mqtt.embedded]\nallow_anonymous = true\n[registry]\ntrusted_keys = [\"k.pub\"]\n";
        let problems = |extra: &str| match parse_config(&format!("{base}{extra}")).unwrap().validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        };
        assert!(problems("dir = \"/r\"\n").is_empty());
        assert!(problems("[registry_s3]\nbucket = \"b\"\n").is_empty());
        assert!(problems("")[0].contains("set `dir`"));
        assert!(problems("dir = \"/r\"\n[registry_s3]\nbucket = \"b\"\n")[0].contains("not both"));
        let plain = problems("[registry_s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\n");
        assert!(plain[0].contains("allow_http"), "{plain:?}");
        assert!(
            problems(
                "[registry_s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
                 access_key_id = { env = \"K\" }\n"
            )[0]
            .contains("go together")
        );
    }

    #[test]
    fn the_scheduler_needs_a_registry_to_register_and_a_template_to_sign_or_run_commands() {
        let config = parse_config(
            "[mqtt.embedded]\nallow_anonymous = true\n[scheduler]\nwork_dir = \"/j\"\nrunner = \"command\"\n\
             [[scheduler.template]]\nname = \"t\"\nrun_config = \"r.toml\"\ncall_ratio = { low = 0.5, high = 0.2 }\n",
        )
        .unwrap();
        let errors = config.validate().unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().all(|e| matches!(e, ValidationError::Scheduler(_))));
        assert!(errors[0].to_string().contains("command_template"), "{}", errors[0]);
    }
}
