//! An on/off choice made automatically unless an environment variable forces it: whether the
//! forward pass streams the layers ([`crate::streaming`]), whether the weights are copied into
//! huge pages ([`crate::weights::huge_pages`]).

use crate::error::{EngineError, Result};

/// What the environment variable asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Decide by the rule of the choice (`auto`, also when unset or empty).
    Auto,
    /// Always on (`1`, `on`, `true`).
    On,
    /// Always off (`0`, `off`, `false`).
    Off,
}

impl Switch {
    /// The value of the environment variable `name`; any other value is a one-line error
    /// naming the variable.
    pub fn from_env(name: &str) -> Result<Self> {
        Self::parse(name, std::env::var(name).ok().as_deref().unwrap_or(""))
    }

    /// Parses a value `v` of the variable `name`.
    pub fn parse(name: &str, v: &str) -> Result<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Switch::Auto),
            "1" | "on" | "true" => Ok(Switch::On),
            "0" | "off" | "false" => Ok(Switch::Off),
            _ => Err(EngineError::Input(format!(
                "{name}={v:?} is not one of auto, on (1), off (0)"
            ))),
        }
    }

    /// Whether the choice is on: forced either way, or in `auto` what `rule` says.
    pub fn is_on(self, rule: impl FnOnce() -> bool) -> bool {
        match self {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => rule(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_decide() {
        assert_eq!(Switch::parse("X", "").unwrap(), Switch::Auto);
        assert_eq!(Switch::parse("X", " ON ").unwrap(), Switch::On);
        assert_eq!(Switch::parse("X", "0").unwrap(), Switch::Off);
        let e = Switch::parse("LOCKSTEP_X", "yes please")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCKSTEP_X") && !e.contains('\n'), "{e}");
        assert!(Switch::Auto.is_on(|| true) && !Switch::Auto.is_on(|| false));
        assert!(Switch::On.is_on(|| false) && !Switch::Off.is_on(|| true));
    }
}
