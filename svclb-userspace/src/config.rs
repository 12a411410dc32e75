//! `svclb run --config FILE`: the flags of `svclb run` in a YAML file, as
//! kube-proxy reads a KubeProxyConfiguration. A field is a flag's long name
//! in camelCase (`--xdp-mode` is `xdpMode`), the spelling of Kubernetes'
//! configuration files and of Helm values, with the value the flag takes:
//!
//! ```yaml
//! devices: [eth0, eth1]
//! xdpMode: native
//! maglevTableSize: 65537
//! ctTcpEstablished: 24h
//! ```
//!
//! Flags given on the command line (or by their environment variable) win
//! over the file. The file's values are checked by the flags' own parsers,
//! so a file accepts exactly what the command line does and a new flag is a
//! new field without any code here.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use crate::cli::Cli;

/// Flags of `svclb run` a file cannot set: the node's name differs per node
/// (--node-name or NODE_NAME), and a file does not name another file.
const NOT_IN_FILE: &[&str] = &["node_name", "config"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error(
        "{path}: unknown field `{field}` (the fields are the flags of `svclb run --help` \
         in camelCase, without nodeName)"
    )]
    UnknownField { path: PathBuf, field: String },
    #[error("{path}: field `{field}`: {message}")]
    BadValue {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The command line, with `svclb run --config FILE`'s file read; exits
/// with a message on errors, as clap's `Parser::parse` does.
pub fn parse() -> Cli {
    match parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(Error::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// `argv` (program name first) parsed, plus the fields of the file that
/// `svclb run --config FILE` names for the flags `argv` does not give.
pub fn parse_from<I, T>(argv: I) -> Result<Cli, Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let config = match matches.subcommand() {
        Some(("run", run)) => run.get_one::<PathBuf>("config").map(|path| (run, path)),
        _ => None,
    };
    let Some((run, path)) = config else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let given = |id: &str| {
        matches!(
            run.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    // `run` takes the rest of the command line: the file's flags go last.
    argv.extend(file_flags(path, given)?);
    Ok(Cli::try_parse_from(argv)?)
}

/// The file's fields as `--flag=value` arguments, leaving out the flags
/// `given` says the command line has.
fn file_flags(path: &Path, given: impl Fn(&str) -> bool) -> Result<Vec<OsString>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    // None: an empty file.
    let fields: Option<BTreeMap<String, serde_json::Value>> = serde_saphyr::from_str(&text)
        .map_err(|e| Error::Yaml {
            path: path.into(),
            message: e.to_string().trim_start_matches("error: ").into(),
        })?;

    let command = Cli::command();
    let run = command.find_subcommand("run").expect("svclb run exists");
    // Checks one flag's value with its own parser; nothing else is required.
    let check = run
        .clone()
        .no_binary_name(true)
        .mut_arg("node_name", |a| a.required(false));

    let mut flags = Vec::new();
    for (field, value) in fields.into_iter().flatten() {
        let arg = run
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !NOT_IN_FILE.contains(&a.get_id().as_str()))
            .find(|a| a.get_long().is_some_and(|long| camel_case(long) == field))
            .ok_or_else(|| Error::UnknownField {
                path: path.into(),
                field: field.clone(),
            })?;
        if given(arg.get_id().as_str()) {
            continue;
        }
        let bad = |message: String| Error::BadValue {
            path: path.into(),
            field: field.clone(),
            message,
        };
        let values = match &value {
            // As if absent: the flag's default.
            serde_json::Value::Null => continue,
            serde_json::Value::Array(items) if arg.get_value_delimiter().is_some() => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("expected a list of plain values".into()))?,
            v => vec![scalar(v).ok_or_else(|| bad(format!("expected a plain value, not {v}")))?],
        };
        if values.is_empty() {
            continue; // an empty list: none, the default of list flags
        }
        let flag = format!("--{}={}", arg.get_long().unwrap(), values.join(","));
        if let Err(e) = check.clone().try_get_matches_from([&flag]) {
            return Err(bad(clap_message(&e)));
        }
        flags.push(flag.into());
    }
    Ok(flags)
}

/// `xdp-mode` -> `xdpMode`.
fn camel_case(kebab: &str) -> String {
    let mut out = String::new();
    for (i, word) in kebab.split('-').enumerate() {
        let mut chars = word.chars();
        match chars.next() {
            Some(c) if i > 0 => out.extend(c.to_uppercase().chain(chars)),
            _ => out.push_str(word),
        }
    }
    out
}

/// A YAML scalar as the command line would spell it.
fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What clap says about a bad value, without its usage hints.
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    rendered
        .lines()
        .map(|l| l.trim_start_matches("error: ").trim())
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, RunArgs};
    use crate::dataplane::XdpModeChoice;
    use std::time::Duration;

    /// `svclb run --node-name n1 --config FILE ARGS` with `yaml` as FILE.
    fn run(name: &str, yaml: &str, args: &[&str]) -> Result<RunArgs, String> {
        let dir = std::env::temp_dir().join(format!("svclb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let mut argv: Vec<OsString> = ["svclb", "run", "--node-name", "n1", "--config"]
            .map(OsString::from)
            .into();
        argv.push(file.clone().into());
        argv.extend(args.iter().map(OsString::from));
        let result = parse_from(argv);
        std::fs::remove_file(&file).unwrap();
        match result {
            Ok(Cli {
                command: Command::Run(a),
                ..
            }) => Ok(*a),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_file_sets_flags() {
        let a = run(
            "only-file",
            "devices: [eth0, eth1]\nxdpMode: native\nmaglevTableSize: 65537\n\
             ctTcpEstablished: 1h\nsnatPorts: 62000-63000\n\
             metricsBindAddress: 0.0.0.0:10249\ncgroup: ~\n",
            &[],
        )
        .unwrap();
        assert_eq!(a.devices, ["eth0", "eth1"]);
        assert_eq!(a.xdp_mode, XdpModeChoice::Native);
        assert_eq!(a.maglev_table_size, 65537);
        assert_eq!(a.ct_tcp_established, Duration::from_secs(3600));
        assert_eq!(a.snat_ports, (62000, 63000));
        assert_eq!(a.metrics_bind_address.to_string(), "0.0.0.0:10249");
        // Absent or null: the default.
        assert_eq!(a.cgroup, None);
        assert_eq!(a.ct_udp, Duration::from_secs(30));
        assert_eq!(a.node_name, "n1");
        // A comma-separated string is a list too, as on the command line.
        assert_eq!(
            run("devices-string", "devices: eth0,eth1\n", &[])
                .unwrap()
                .devices,
            ["eth0", "eth1"]
        );
        // An empty file sets nothing.
        let empty = run("empty", "", &[]).unwrap();
        assert_eq!(empty.xdp_mode, XdpModeChoice::Auto);
    }

    #[test]
    fn flags_on_the_command_line_override_the_file() {
        let yaml = "devices: [eth0]\nxdpMode: native\nsyncPeriod: 1m\n";
        let a = run(
            "override",
            yaml,
            &["--xdp-mode=generic", "--devices", "eth9"],
        )
        .unwrap();
        assert_eq!(a.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(a.devices, ["eth9"], "replaced, not appended");
        assert_eq!(a.sync_period, Duration::from_secs(60), "from the file");
        // A flag given with its default value still wins.
        let a = run("override-default", yaml, &["--xdp-mode", "auto"]).unwrap();
        assert_eq!(a.xdp_mode, XdpModeChoice::Auto);
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        let e = run("unknown", "xdpMode: native\nxdp_mode: native\n", &[]).unwrap_err();
        assert!(e.contains("unknown field `xdp_mode`"), "{e}");
        assert!(e.contains("unknown.yaml"), "{e}");
        // Per node, and testing only: not in the file.
        for field in ["nodeName: n2", "config: other.yaml", "injectMapFaults: 0.5"] {
            let e = run("not-in-file", field, &[]).unwrap_err();
            assert!(e.contains("unknown field"), "{field}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_field_and_file() {
        for (yaml, says) in [
            ("xdpMode: fast\n", "fast"),
            ("maglevTableSize: 100\n", "maglevTableSize"),
            ("syncPeriod: 0s\n", "must be positive"),
            ("snatPorts: 5-1\n", "MIN <= MAX"),
            ("devices: {eth0: true}\n", "expected a plain value"),
        ] {
            let e = run("bad", yaml, &[]).unwrap_err();
            let field = yaml.split(':').next().unwrap();
            assert!(e.contains(&format!("field `{field}`")), "{yaml}: {e}");
            assert!(e.contains("bad.yaml"), "{yaml}: {e}");
            assert!(e.contains(says), "{yaml}: {e}");
        }
        // Not YAML, or a key twice: the parser's message, with the file.
        for yaml in ["xdpMode: [native\n", "xdpMode: native\nxdpMode: generic\n"] {
            let e = run("broken", yaml, &[]).unwrap_err();
            assert!(
                e.contains("broken.yaml") && e.contains("line"),
                "{yaml}: {e}"
            );
        }
    }
}
