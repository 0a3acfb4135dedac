//! Holds no code: the cross-part tests live in `e2e/`.
