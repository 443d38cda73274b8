//! The loaded models, by version name: `/api/<version>/…` looks its engine up here.

use std::collections::BTreeMap;
use std::sync::Arc;

use streamgate_inference::Generator;

/// Version name → engine. Built once at start-up; read-only afterwards.
#[derive(Clone, Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<dyn Generator>>,
}

impl ModelRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, version: impl Into<String>, model: Arc<dyn Generator>) {
        self.models.insert(version.into(), model);
    }

    /// The engine serving `version`.
    pub fn get(&self, version: &str) -> Option<&Arc<dyn Generator>> {
        self.models.get(version)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn Generator>)> {
        self.models.iter().map(|(v, m)| (v.as_str(), m))
    }

    pub fn versions(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Every model loaded and its worker accepting work.
    pub fn all_ready(&self) -> bool {
        !self.models.is_empty() && self.models.values().all(|m| m.is_ready())
    }
}
