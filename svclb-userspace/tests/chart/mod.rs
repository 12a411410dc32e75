//! Renders deploy/helm/svclb as `helm template` would, for the tests and for
//! `cargo xtask deploy-yaml` (helm itself is not installable here). The Go
//! template engine is gtmpl-ng; Helm's functions are not part of it, so the
//! few the chart uses are below, written to behave as Sprig's and Helm's do:
//! `default`, `quote`, `toYaml`, `nindent`, `sha256sum`, `required`, `fail`.
//! No `include`, `tpl` or `.Files` (gtmpl's functions cannot reach the
//! template set); the chart's README says so.
use std::collections::HashMap;
use std::path::Path;

use gtmpl_ng::{Context, FuncError, Template, Value};

/// Where the chart is installed: `helm install NAME -n NAMESPACE`.
pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The chart's templates rendered with its values.yaml overridden by
/// `values` (YAML, merged as `helm -f` merges), in file name order, each
/// with its file name; templates that render to nothing are left out.
pub fn render(
    chart: &Path,
    release: &Release,
    values: &str,
) -> Result<Vec<(String, String)>, String> {
    let read = |name: &str| {
        let path = chart.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let yaml = |name: &str, text: &str| -> Result<serde_json::Value, String> {
        let v: Option<serde_json::Value> =
            serde_saphyr::from_str(text).map_err(|e| format!("{name}: {e}"))?;
        Ok(v.unwrap_or(serde_json::Value::Null))
    };
    let meta = yaml("Chart.yaml", &read("Chart.yaml")?)?;
    let mut merged = yaml("values.yaml", &read("values.yaml")?)?;
    merge(&mut merged, yaml("values", values)?);
    let context = serde_json::json!({
        "Values": merged,
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta["appVersion"],
        },
        "Release": {
            "Name": release.name,
            "Namespace": release.namespace,
            "Service": "Helm",
        },
    });
    let context = Context::from(to_gtmpl(&context));

    let mut names: Vec<String> = std::fs::read_dir(chart.join("templates"))
        .map_err(|e| format!("{}/templates: {e}", chart.display()))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let text = read(&format!("templates/{name}"))?;
        let mut template = Template::default();
        template.add_funcs(FUNCTIONS);
        template
            .parse(text)
            .map_err(|e| format!("templates/{name}: {e}"))?;
        let rendered = template
            .render(&context)
            .map_err(|e| format!("templates/{name}: {e}"))?;
        if rendered.contains("<no value>") {
            return Err(format!("templates/{name}: a value it reads is missing"));
        }
        if !rendered.trim().is_empty() {
            out.push((name, rendered));
        }
    }
    Ok(out)
}

/// Helm's merge of user values over the chart's: maps key by key, anything
/// else replaced, null removes the key.
fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (b, o) if !o.is_null() => *b = o,
        _ => {}
    }
}

fn to_gtmpl(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into(),
            (None, Some(f)) => f.into(),
            _ => Value::Nil,
        },
        serde_json::Value::String(s) => s.as_str().into(),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(to_gtmpl).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (k.clone(), to_gtmpl(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => (*b).into(),
        Value::String(s) => s.as_str().into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.into(),
            (None, Some(u), _) => u.into(),
            (None, None, Some(f)) => f.into(),
            _ => serde_json::Value::Null,
        },
        Value::Array(a) => a.iter().map(to_json).collect(),
        // serde_json's map is sorted: toYaml's keys come out in order, as Helm's.
        Value::Map(m) | Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        _ => serde_json::Value::Null,
    }
}

/// Go's fmt.Sprint of a template value, as Sprig's string functions take it.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Nil | Value::NoValue => String::new(),
        v => v.to_string(),
    }
}

fn arg<'a>(name: &str, args: &'a [Value], n: usize) -> Result<&'a [Value], FuncError> {
    if args.len() != n {
        return Err(FuncError::ExactlyXArgs(name.into(), n));
    }
    Ok(args)
}

/// Sprig's emptiness: nil, false, 0, "" and empty lists and maps.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Nil | Value::NoValue => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Map(m) | Value::Object(m) => m.is_empty(),
        Value::Function(_) => false,
    }
}

const FUNCTIONS: &[(&str, gtmpl_ng::Func)] = &[
    ("default", default),
    ("quote", quote),
    ("toYaml", to_yaml),
    ("nindent", nindent),
    ("sha256sum", sha256sum),
    ("required", required),
    ("fail", fail),
];

/// `default DEFAULT VALUE`: VALUE unless empty.
fn default(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("default", args, 2)?;
    Ok(if is_empty(&a[1]) { &a[0] } else { &a[1] }.clone())
}

/// `quote VALUE`: a double-quoted string (Go's %q; JSON's escapes agree for
/// what a chart holds).
fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("quote", args, 1)?;
    Ok(serde_json::to_string(&text(&a[0])).unwrap().into())
}

/// `toYaml VALUE`: YAML with sorted keys and no final newline, as Helm's.
fn to_yaml(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("toYaml", args, 1)?;
    let yaml =
        serde_saphyr::to_string(&to_json(&a[0])).map_err(|e| FuncError::Generic(e.to_string()))?;
    Ok(yaml.trim_end_matches('\n').into())
}

/// `nindent N TEXT`: a newline, then every line of TEXT indented by N.
fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("nindent", args, 2)?;
    let n = match &a[0] {
        Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
        _ => return Err(FuncError::UnableToConvertFromValue),
    };
    let pad = " ".repeat(n);
    Ok(format!("\n{pad}{}", text(&a[1]).replace('\n', &format!("\n{pad}"))).into())
}

fn sha256sum(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("sha256sum", args, 1)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, text(&a[0]).as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(hex.into())
}

/// `required MESSAGE VALUE`: VALUE, or MESSAGE as the error when it is nil
/// or "".
fn required(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("required", args, 2)?;
    match &a[1] {
        Value::Nil | Value::NoValue => Err(FuncError::Generic(text(&a[0]))),
        Value::String(s) if s.is_empty() => Err(FuncError::Generic(text(&a[0]))),
        v => Ok(v.clone()),
    }
}

fn fail(args: &[Value]) -> Result<Value, FuncError> {
    let a = arg("fail", args, 1)?;
    Err(FuncError::Generic(text(&a[0])))
}
