//! The boot benchmark as a picture: for each arch, the median boot from host start to ready as a
//! stacked bar (host, VMM and kernel, openshell-init's phases), and beside it the same boot with
//! a busybox shell init in its place. Drawn with plotters into a PNG the README shows.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};

/// A font is needed for labels; Debian's fonts-dejavu-core ships this one (.ci/run installs it).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const HOST: RGBColor = RGBColor(150, 150, 150);
const KERNEL: RGBColor = RGBColor(70, 110, 190);
const INIT: RGBColor = RGBColor(60, 170, 90);
const SPAWN: RGBColor = RGBColor(150, 210, 160);
const SHELL: RGBColor = RGBColor(210, 80, 60);

struct Bar {
    label: String,
    /// (what, ms, colour)
    parts: Vec<(&'static str, f64, RGBColor)>,
}

fn bars(docs: &[Value]) -> Result<Vec<Bar>> {
    let mut out = Vec::new();
    for d in docs {
        let arch = d["arch"].as_str().unwrap_or("?");
        let m = &d["medians_ms"];
        let get = |k: &str| {
            m[k].as_f64()
                .ok_or_else(|| Error::msg(format!("benchmark result for {arch} lacks {k}")))
        };
        let (host, init, ready, shell) = (
            get("host")?,
            get("init")?,
            get("ready")?,
            get("shell_init")?,
        );
        // Older results have no separate workload start: it was counted as init's.
        let spawn = m["init_workload"]
            .as_f64()
            .map_or(0.0, |w| (w - init).max(0.0));
        let kernel = (ready - host - init - spawn).max(0.0);
        out.push(Bar {
            label: format!("{arch}: openshell-init"),
            parts: vec![
                ("host", host, HOST),
                ("VMM + kernel", kernel, KERNEL),
                ("init", init, INIT),
                ("workload spawn", spawn, SPAWN),
            ],
        });
        out.push(Bar {
            label: format!("{arch}: shell init"),
            parts: vec![
                ("host", host, HOST),
                ("VMM + kernel", kernel, KERNEL),
                ("shell init", shell, SHELL),
            ],
        });
    }
    Ok(out)
}

pub fn draw(docs: &[Value], path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).map_err(|e| Error::io("read", Path::new(FONT), e))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| Error::msg(format!("{FONT} is not a usable font")))?;
    let bars = bars(docs)?;
    let longest = bars
        .iter()
        .map(|b| b.parts.iter().map(|p| p.1).sum::<f64>())
        .fold(0.0, f64::max);
    let runs = docs.first().and_then(|d| d["runs"].as_u64()).unwrap_or(0);
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("drawing {}: {e}", path.display()));
    let height = 110 + 80 * bars.len() as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Host start to ready under qemu TCG, median of {runs} boots (ms)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..longest * 1.12, 0f64..n)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    // Each row, top down: its name above a bar of coloured parts.
    for (row, bar) in bars.iter().enumerate() {
        let y = n - 1.0 - row as f64;
        let name = Text::new(bar.label.clone(), (0.0, y + 0.95), ("sans-serif", 16));
        chart
            .draw_series(std::iter::once(name))
            .map_err(|e| err(&e))?;
        let mut x = 0.0;
        for (what, ms, colour) in &bar.parts {
            let rect = Rectangle::new([(x, y + 0.1), (x + ms, y + 0.62)], colour.filled());
            chart
                .draw_series(std::iter::once(rect))
                .map_err(|e| err(&e))?;
            if *ms >= longest * 0.08 {
                let text = Text::new(
                    format!("{what} {ms:.0}"),
                    (x + longest * 0.005, y + 0.5),
                    ("sans-serif", 14).into_font().color(&WHITE),
                );
                chart
                    .draw_series(std::iter::once(text))
                    .map_err(|e| err(&e))?;
            }
            x += ms;
        }
        let total = Text::new(
            format!("{x:.0} ms"),
            (x + longest * 0.01, y + 0.5),
            ("sans-serif", 15),
        );
        chart
            .draw_series(std::iter::once(total))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_is_what_host_and_init_leave_of_the_total() {
        let doc = serde_json::json!({"arch": "x86_64", "runs": 1,
            "medians_ms": {"host": 10.0, "init": 200.0, "ready": 1200.0, "shell_init": 900.0}});
        let b = bars(&[doc]).expect("bars");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].parts[1].1, 990.0);
        assert_eq!(b[1].parts[2].1, 900.0);
        assert!(bars(&[serde_json::json!({"arch": "x"})]).is_err());
    }

    #[test]
    fn the_workload_spawn_is_drawn_apart_from_init() {
        let doc = serde_json::json!({"arch": "x86_64", "runs": 1,
            "medians_ms": {"host": 10.0, "init": 200.0, "init_workload": 230.0,
                           "ready": 1200.0, "shell_init": 900.0}});
        let b = bars(&[doc]).expect("bars");
        let parts: Vec<(&str, f64)> = b[0].parts.iter().map(|p| (p.0, p.1)).collect();
        assert_eq!(
            parts,
            vec![
                ("host", 10.0),
                ("VMM + kernel", 960.0),
                ("init", 200.0),
                ("workload spawn", 30.0)
            ]
        );
    }
}
