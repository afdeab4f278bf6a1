//! `--config FILE`: options from a file, spliced into the command line where
//! `--config` stood, so options after it override the file.

use std::ffi::OsString;
use std::path::Path;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `name = value`.
    #[error("config {path} line {line}: {problem}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// `--config` without a file name.
    #[error("--config needs a file name")]
    Missing,
}

/// Replace `--config FILE` (or `--config=FILE`) in `args` by the options the
/// file holds.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(i) = args
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(args);
    };
    let flag = args[i].to_string_lossy().into_owned();
    let (path, used) = match flag.strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (
            args.get(i + 1)
                .map(|p| p.to_string_lossy().into_owned())
                .ok_or(ConfigError::Missing)?,
            2,
        ),
    };
    let text = std::fs::read_to_string(Path::new(&path)).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let from_file = parse(&path, &text)?;
    let mut out: Vec<OsString> = args[..i].to_vec();
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(args[i + used..].iter().cloned());
    Ok(out)
}

/// The options in a config file's text, as command-line words.
pub fn parse(path: &str, text: &str) -> Result<Vec<String>, ConfigError> {
    let mut words = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |problem: String| ConfigError::Syntax {
            path: path.to_string(),
            line: n + 1,
            problem,
        };
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| err(format!("expected `name = value`, found {line:?}")))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(err(format!("{name:?} is not an option name")));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let flag = format!("--{}", name.replace('_', "-"));
        match value {
            "true" => words.push(flag),
            "false" => {}
            v => {
                words.push(flag);
                words.push(v.to_string());
            }
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_words_and_flags() {
        let w = parse(
            "f",
            "# pair\nprimary = true\nbackup = false\npeer = \"10.0.0.2:7000\"\nmem = 64 # MiB\npeer_timeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!(
            w,
            [
                "--primary",
                "--peer",
                "10.0.0.2:7000",
                "--mem",
                "64",
                "--peer-timeout-ms",
                "500"
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = parse("cfg.toml", "mem = 64\njust words\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg.toml line 2"), "{e}");
    }

    #[test]
    fn config_is_spliced_where_it_stood() {
        let dir = std::env::temp_dir().join(format!("ftvmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c");
        std::fs::write(&f, "mem = 16\n").unwrap();
        let args: Vec<OsString> = ["ftvmm", "run", "--config"]
            .iter()
            .map(OsString::from)
            .chain([f.clone().into_os_string(), "--mem".into(), "32".into()])
            .collect();
        let out = expand(args).unwrap();
        let out: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(out, ["ftvmm", "run", "--mem", "16", "--mem", "32"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
