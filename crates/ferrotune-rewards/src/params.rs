//! Typed access to the free-form parameters of one `[[rewards]]` entry.
//!
//! Owns: unknown-key rejection and type checks with one-line messages naming the reward and the
//! key. Does not own: what a parameter means (each reward's `from_params`).

use crate::RewardError;

pub(crate) struct Params<'a> {
    reward: &'a str,
    table: &'a toml::Table,
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

impl<'a> Params<'a> {
    /// Reject any key not in `allowed` (typos must not silently fall back to defaults).
    pub fn new(
        reward: &'a str,
        table: &'a toml::Table,
        allowed: &[&str],
    ) -> Result<Self, RewardError> {
        for key in table.keys() {
            if !allowed.contains(&key.as_str()) {
                let allowed = if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                };
                return Err(RewardError::UnknownParam {
                    reward: reward.into(),
                    key: key.clone(),
                    allowed,
                });
            }
        }
        Ok(Params { reward, table })
    }

    pub fn reward(&self) -> &str {
        self.reward
    }

    fn type_err(&self, key: &str, expected: &str, v: &toml::Value) -> RewardError {
        RewardError::ParamType {
            reward: self.reward.into(),
            key: key.into(),
            expected: expected.into(),
            found: kind(v).into(),
        }
    }

    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> RewardError {
        RewardError::InvalidParam {
            reward: self.reward.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn missing(&self, key: &str, hint: &str) -> RewardError {
        RewardError::MissingParam {
            reward: self.reward.into(),
            key: key.into(),
            hint: hint.into(),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    pub fn str(&self, key: &str) -> Result<Option<String>, RewardError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.type_err(key, "a string", v)),
        }
    }

    /// A string from a fixed set of choices.
    pub fn choice(
        &self,
        key: &str,
        choices: &[&str],
        default: &str,
    ) -> Result<String, RewardError> {
        let v = self.str(key)?.unwrap_or_else(|| default.to_string());
        if choices.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(self.invalid(key, format!("`{v}` is not one of {}", choices.join(", "))))
        }
    }

    /// A number; TOML integers are accepted (`weight = 1`).
    pub fn f64(&self, key: &str) -> Result<Option<f64>, RewardError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(f)) if f.is_finite() => Ok(Some(*f)),
            Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.type_err(key, "a finite number", v)),
        }
    }

    pub fn non_negative(&self, key: &str) -> Result<Option<f64>, RewardError> {
        match self.f64(key)? {
            Some(x) if x < 0.0 => Err(self.invalid(key, format!("must be >= 0, got {x}"))),
            v => Ok(v),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, RewardError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v) => Err(self.type_err(key, "a non-negative integer", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, RewardError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_err(key, "a boolean", v)),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Option<Vec<String>>, RewardError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(self.type_err(key, "an array of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.type_err(key, "an array of strings", v)),
        }
    }
}
