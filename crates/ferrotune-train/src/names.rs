//! Config names of the train crate's option enums (`loss_type`, `scale_rewards`,
//! `lr_scheduler_type`, ...), each written once: [`config_names!`] gives an enum `ALL`, `NAMES`,
//! `as_str`, `FromStr` (an unknown name is refused with the enum's own error) and `Display`
//! from one `Variant => "name"` list.
//!
//! Owns: the macro. Does not own: the enums (each lives beside the math it selects).

/// `config_names!(Enum, ErrorType, ErrorVariant, { Variant => "name", ... })`.
macro_rules! config_names {
    ($ty:ident, $err_ty:ty, $err:path, { $($var:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in the order the config help lists them.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$var),+];
            /// The config name of each of [`Self::ALL`].
            pub const NAMES: [&'static str; [$($name),+].len()] = [$($name),+];

            /// The name in a config file (TRL's / Hugging Face's).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$var => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $err_ty;
            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$var),)+
                    _ => Err($err(s.to_string())),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use config_names;

#[cfg(test)]
mod tests {
    use crate::grpo_loss::{ImportanceSamplingLevel, LossType, ScaleRewards};
    use crate::ppo_loss::KlEstimator;
    use crate::pref_loss::DpoLossType;
    use crate::schedule::ScheduleKind;

    /// The names a config file is checked against (`NAMES`) are the ones serde reads and writes
    /// (`rename_all = "snake_case"` on each enum), and each parses back to its value.
    #[test]
    fn config_names_are_the_serde_names() {
        fn check<T>(all: &[T], name: fn(&T) -> &'static str)
        where
            T: serde::Serialize + std::str::FromStr + PartialEq + std::fmt::Debug,
        {
            for v in all {
                let json = serde_json::to_string(v).unwrap();
                assert_eq!(json, format!("\"{}\"", name(v)), "{v:?}");
                assert_eq!(name(v).parse::<T>().ok().as_ref(), Some(v));
            }
        }
        check(&LossType::ALL, |v| v.as_str());
        check(&ScaleRewards::ALL, |v| v.as_str());
        check(&ImportanceSamplingLevel::ALL, |v| v.as_str());
        check(&DpoLossType::ALL, |v| v.as_str());
        check(&KlEstimator::ALL, |v| v.as_str());
        check(&ScheduleKind::ALL, |v| v.as_str());
        assert_eq!(
            LossType::NAMES,
            ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo"]
        );
    }
}
