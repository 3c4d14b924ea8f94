//! The configuration parser: arbitrary TOML over the defaults, as `Config::load` layers it,
//! then validation and the instance resolution done at start. Must never panic: a bad file is
//! an error naming the key.
#![no_main]

use dps_server::config::Config;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
    if let Ok(cfg) = fig.extract::<Config>() {
        if cfg.validate().is_ok() {
            for i in &cfg.instances {
                let _ = i.resolve(None);
            }
        }
    }
});
