//! The text syntax of gauge samples, which the classic and the OpenMetrics formats
//! share; written by hand for speed (see the module doc of `metrics`).

/// Writes `s` as a label value: `\\`, `"` and newlines escaped.
pub(super) fn push_label_value(out: &mut String, s: &str) {
    if s.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    } else {
        out.push_str(s);
    }
}

/// `# HELP` and `# TYPE` of a gauge family (prometheus-client's help style).
pub(super) fn gauge_family(out: &mut String, name: &str, help: &str) {
    use std::fmt::Write;
    let _ = write!(out, "# HELP {name} {help}.\n# TYPE {name} gauge\n");
}

/// One sample: `name{labels,extra} value`.
pub(super) fn sample(
    out: &mut String,
    name: &str,
    labels: &str,
    extra: &[(&str, &str)],
    value: f64,
) {
    use std::fmt::Write;
    out.push_str(name);
    out.push('{');
    out.push_str(labels);
    for (k, v) in extra {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        push_label_value(out, v);
        out.push('"');
    }
    out.push_str("} ");
    if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_label_values_and_print_integers_plainly() {
        let mut out = String::new();
        gauge_family(&mut out, "m", "Help");
        sample(
            &mut out,
            "m",
            "a=\"x\"",
            &[("relay", "http://h/\"q\"\\\n")],
            1.0,
        );
        sample(&mut out, "m", "", &[("k", "v")], 0.25);
        assert_eq!(
            out,
            "# HELP m Help.\n# TYPE m gauge\nm{a=\"x\",relay=\"http://h/\\\"q\\\"\\\\\\n\"} 1\nm{k=\"v\"} 0.25\n"
        );
    }
}
