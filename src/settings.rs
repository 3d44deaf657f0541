//! The layered resolution of a setting, written once: flag > environment variable > the config
//! file's table > default. clap merges a flag and its environment variable into one `Option`
//! (`#[arg(long, env = "...")]`), serde reads the file's table (`deny_unknown_fields`), and a
//! [`Setting`] declares the rest: how the setting is spelled in each layer, its default and its
//! check. A stage's settings therefore read as a table of declarations:
//!
//! ```
//! use eventpipe::settings::Setting;
//!
//! const BATCH_SIZE: Setting<u32> =
//!     Setting::new("log.batch_size", "EVENTPIPE_LOG_BATCH_SIZE", "--batch-size")
//!         .default(1000)
//!         .between(1, 100_000);
//!
//! // flag (or its environment variable), then the file, then the default
//! assert_eq!(BATCH_SIZE.resolve(&Some(20), &Some(10)).unwrap(), 20);
//! assert_eq!(BATCH_SIZE.resolve(&None, &Some(10)).unwrap(), 10);
//! assert_eq!(BATCH_SIZE.resolve(&None, &None).unwrap(), 1000);
//! assert_eq!(
//!     BATCH_SIZE.resolve(&Some(0), &None).unwrap_err().to_string(),
//!     "invalid setting log.batch_size (env EVENTPIPE_LOG_BATCH_SIZE, flag --batch-size) = \"0\": \
//!      expected 1 to 100000"
//! );
//! ```
//!
//! A bad value is a one-line [`ConfigError`] naming the setting in every layer, so the user
//! knows where to fix it whichever layer it came from.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::str::FromStr;

/// A bad setting, always rendered as one line that names the setting and where it can be set.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid setting {setting} = {value:?}: {reason}")]
    Invalid {
        setting: String,
        value: String,
        reason: String,
    },
}

/// How one setting is spelled in each layer, so errors can tell the user where to fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingName {
    pub key: &'static str,
    pub env: &'static str,
    pub flag: &'static str,
}

impl SettingName {
    pub const fn new(key: &'static str, env: &'static str, flag: &'static str) -> Self {
        SettingName { key, env, flag }
    }

    /// The one-line error for a bad `value` of this setting.
    pub fn invalid(&self, value: impl Into<String>, reason: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            setting: self.to_string(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

impl std::fmt::Display for SettingName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (env {}, flag {})", self.key, self.env, self.flag)
    }
}

/// A stage's table of the config file (`[log]`, ...): the stage's own type, which the stage
/// reads itself (`config::ConfigFile::table`); `deny_unknown_fields` makes a typo an error.
pub trait FileTable: serde::de::DeserializeOwned + Default {
    const NAME: &'static str;
}

/// The first layer that has a value: the flag (or its environment variable), else the file.
/// For settings resolved as a group (two that exclude each other, credentials); single settings
/// use a [`Setting`].
pub fn layer<T: Clone>(flag: &Option<T>, file: &Option<T>) -> Option<T> {
    flag.as_ref().or(file.as_ref()).cloned()
}

/// A type a setting can hold.
pub trait Value: Clone {
    /// How a declaration writes the default (`&'static str` for owned text, so it can be const).
    type Default: Copy;
    fn from_default(default: Self::Default) -> Self;
    /// The value as an error message quotes it.
    fn shown(&self) -> String;
    /// The value for a numeric check.
    fn number(&self) -> Option<u64> {
        None
    }
    /// The value for a text check.
    fn text(&self) -> Option<&str> {
        None
    }
}

/// The settings `at_least` and `between` apply to.
pub trait Number: Value {}

macro_rules! numbers {
    ($($t:ty),*) => {$(
        impl Value for $t {
            type Default = $t;
            fn from_default(default: $t) -> $t {
                default
            }
            fn shown(&self) -> String {
                self.to_string()
            }
            fn number(&self) -> Option<u64> {
                u64::try_from(*self).ok()
            }
        }
        impl Number for $t {}
    )*};
}
numbers!(u32, u64, usize);

impl Value for bool {
    type Default = bool;
    fn from_default(default: bool) -> bool {
        default
    }
    fn shown(&self) -> String {
        self.to_string()
    }
}

impl Value for String {
    type Default = &'static str;
    fn from_default(default: &'static str) -> String {
        default.to_string()
    }
    fn shown(&self) -> String {
        self.clone()
    }
    fn text(&self) -> Option<&str> {
        Some(self)
    }
}

impl Value for PathBuf {
    type Default = &'static str;
    fn from_default(default: &'static str) -> PathBuf {
        PathBuf::from(default)
    }
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

/// What a value must satisfy.
#[derive(Debug, Clone, Copy)]
enum Check {
    Any,
    AtLeast(u64),
    Between(u64, u64),
    Text(fn(&str) -> Result<(), String>),
}

impl Check {
    fn apply<T: Value>(self, value: &T) -> Result<(), String> {
        match (self, value.number(), value.text()) {
            (Check::AtLeast(min), Some(n), _) if n < min => Err(format!("must be at least {min}")),
            (Check::Between(low, high), Some(n), _) if n < low || n > high => {
                Err(format!("expected {low} to {high}"))
            }
            (Check::Text(check), _, Some(text)) => check(text),
            _ => Ok(()),
        }
    }
}

/// One setting: its name in the file, the environment and the flags, its default and its check.
/// Declared as a `const`; [`Setting::resolve`] merges the layers and validates the result.
#[derive(Debug, Clone, Copy)]
pub struct Setting<T: Value> {
    pub name: SettingName,
    default: Option<T::Default>,
    check: Check,
    value: PhantomData<fn() -> T>,
}

impl<T: Value> Setting<T> {
    /// A setting without a default (see [`Setting::optional`] and [`Setting::resolve_or`]).
    pub const fn new(key: &'static str, env: &'static str, flag: &'static str) -> Self {
        Setting {
            name: SettingName::new(key, env, flag),
            default: None,
            check: Check::Any,
            value: PhantomData,
        }
    }

    /// The value when no layer sets one.
    pub const fn default(self, default: T::Default) -> Self {
        Setting {
            default: Some(default),
            ..self
        }
    }

    /// The flag's value, else the file's, else the declared default; then checked.
    pub fn resolve(&self, flag: &Option<T>, file: &Option<T>) -> Result<T, ConfigError> {
        self.resolve_or(flag, file, || {
            let default = self
                .default
                .unwrap_or_else(|| panic!("{} is declared without a default", self.name.key));
            T::from_default(default)
        })
    }

    /// Like [`Setting::resolve`], for a default computed from other settings.
    pub fn resolve_or(
        &self,
        flag: &Option<T>,
        file: &Option<T>,
        default: impl FnOnce() -> T,
    ) -> Result<T, ConfigError> {
        let value = layer(flag, file).unwrap_or_else(default);
        self.checked(value)
    }

    /// The flag's value, else the file's, checked; `None` when neither sets it.
    pub fn optional(&self, flag: &Option<T>, file: &Option<T>) -> Result<Option<T>, ConfigError> {
        layer(flag, file)
            .map(|value| self.checked(value))
            .transpose()
    }

    /// Resolves the raw value, then converts it (a URL, an address, a name of a choice); a
    /// conversion that fails is a one-line error naming the setting.
    pub fn resolve_with<U>(
        &self,
        flag: &Option<T>,
        file: &Option<T>,
        convert: impl FnOnce(&T) -> Result<U, String>,
    ) -> Result<U, ConfigError> {
        let raw = self.resolve(flag, file)?;
        convert(&raw).map_err(|reason| self.invalid(raw.shown(), reason))
    }

    /// Like [`Setting::resolve_with`], for a setting without a default.
    pub fn optional_with<U>(
        &self,
        flag: &Option<T>,
        file: &Option<T>,
        convert: impl FnOnce(&T) -> Result<U, String>,
    ) -> Result<Option<U>, ConfigError> {
        self.optional(flag, file)?
            .map(|raw| convert(&raw).map_err(|reason| self.invalid(raw.shown(), reason)))
            .transpose()
    }

    /// A flag given as text (to name the setting when it does not parse, which clap would not).
    pub fn parse_flag(&self, raw: &Option<String>, reason: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
    {
        raw.as_ref()
            .map(|raw| {
                raw.trim()
                    .parse::<T>()
                    .map_err(|_| self.invalid(raw.as_str(), reason))
            })
            .transpose()
    }

    /// The one-line error for a bad `value` of this setting.
    pub fn invalid(&self, value: impl Into<String>, reason: impl ToString) -> ConfigError {
        self.name.invalid(value, reason)
    }

    fn checked(&self, value: T) -> Result<T, ConfigError> {
        match self.check.apply(&value) {
            Ok(()) => Ok(value),
            Err(reason) => Err(self.invalid(value.shown(), reason)),
        }
    }
}

impl<T: Number> Setting<T> {
    /// Refuses values below `min`.
    pub const fn at_least(self, min: u64) -> Self {
        Setting {
            check: Check::AtLeast(min),
            ..self
        }
    }

    /// Refuses values outside `low..=high`.
    pub const fn between(self, low: u64, high: u64) -> Self {
        Setting {
            check: Check::Between(low, high),
            ..self
        }
    }
}

impl Setting<String> {
    /// Refuses what Kafka does not accept as a topic name.
    pub const fn topic_name(self) -> Self {
        self.check(topic_name)
    }

    /// Refuses text for which `check` returns the reason.
    pub const fn check(self, check: fn(&str) -> Result<(), String>) -> Self {
        Setting {
            check: Check::Text(check),
            ..self
        }
    }
}

/// Kafka's legal topic names.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The topic-name check of [`Setting::topic_name`], for settings resolved as a group.
pub fn topic_name(name: &str) -> Result<(), String> {
    match valid_topic_name(name) {
        true => Ok(()),
        false => Err("not a valid topic name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: Setting<String> = Setting::new("t.topic", "T_TOPIC", "--topic")
        .default("in")
        .topic_name();
    const SIZE: Setting<usize> = Setting::new("t.size", "T_SIZE", "--size")
        .default(64)
        .at_least(64);
    const PATH: Setting<PathBuf> = Setting::new("t.path", "T_PATH", "--path");

    #[test]
    fn flag_beats_file_beats_default() {
        let (flag, file) = (Some("a".to_string()), Some("b".to_string()));
        assert_eq!(TOPIC.resolve(&flag, &file).unwrap(), "a");
        assert_eq!(TOPIC.resolve(&None, &file).unwrap(), "b");
        assert_eq!(TOPIC.resolve(&None, &None).unwrap(), "in");
        assert_eq!(TOPIC.resolve_or(&None, &None, || "x".into()).unwrap(), "x");
        assert_eq!(PATH.optional(&None, &None).unwrap(), None);
        assert_eq!(
            PATH.optional(&None, &Some("f".into())).unwrap(),
            Some(PathBuf::from("f"))
        );
    }

    #[test]
    fn checks_name_the_setting_in_every_layer_on_one_line() {
        let message = TOPIC
            .resolve(&None, &Some("a b".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "invalid setting t.topic (env T_TOPIC, flag --topic) = \"a b\": not a valid topic name"
        );
        let message = SIZE.resolve(&Some(63), &None).unwrap_err().to_string();
        assert!(
            message.ends_with("= \"63\": must be at least 64"),
            "{message}"
        );
        assert_eq!(SIZE.resolve(&Some(64), &None).unwrap(), 64);
        let message = SIZE
            .parse_flag(&Some("6x".into()), "expected a number")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("T_SIZE") && message.contains("\"6x\""),
            "{message}"
        );
        assert_eq!(SIZE.parse_flag(&Some(" 65 ".into()), "").unwrap(), Some(65));
    }

    #[test]
    fn conversions_that_fail_name_the_raw_value() {
        let parsed = TOPIC.resolve_with(&Some("7".into()), &None, |raw| {
            raw.parse::<u8>().map_err(|e| e.to_string())
        });
        assert_eq!(parsed.unwrap(), 7);
        let message = TOPIC
            .resolve_with(&Some("x".into()), &None, |raw| {
                raw.parse::<u8>().map_err(|e| e.to_string())
            })
            .unwrap_err()
            .to_string();
        assert!(message.contains("= \"x\": invalid digit"), "{message}");
    }

    #[test]
    fn topic_names_follow_kafka() {
        assert!(valid_topic_name("create_user_in.dlq"));
        for bad in ["", ".", "..", "a b", &"x".repeat(250)] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }
}
