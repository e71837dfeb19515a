//! Drawing the report model with plotters: PNG (bitmap backend, encoded with the `png`
//! crate) or SVG. The font is embedded (an ASCII subset of DejaVu Sans, see
//! assets/DejaVuSans-LICENSE.txt), so a fresh machine needs no font package.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::data::{MarkKind, Model, Panel};
use crate::episode::dir::write_file_replacing;
use crate::error::Error;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-ascii.ttf");
const FAMILY: &str = "sans-serif";

pub const WIDTH: u32 = 1400;
const PANEL_HEIGHT: u32 = 230;
const TITLE_HEIGHT: u32 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

/// The picture size for `panels` stacked panels.
pub fn canvas_size(panels: usize) -> (u32, u32) {
    (WIDTH, TITLE_HEIGHT + PANEL_HEIGHT * panels.max(1) as u32)
}

fn register_font() -> Result<(), Error> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Other("the embedded font does not load".into()))
    }
}

/// Compact number with an SI suffix (1.5k, 2.3M); small values keep decimals.
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e12 {
        (v / 1e12, "T")
    } else if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if suffix.is_empty() && a < 10.0 && a != 0.0 {
        format!("{x:.3}")
    } else if suffix.is_empty() {
        format!("{x:.1}")
    } else {
        format!("{x:.2}{suffix}")
    }
}

fn phase_color(phase: &str) -> RGBColor {
    match phase {
        "clean" => RGBColor(60, 170, 90),
        "armed" => RGBColor(230, 190, 40),
        "infecting" => RGBColor(240, 120, 30),
        "infected_running" => RGBColor(220, 40, 40),
        "dormant" => RGBColor(110, 110, 200),
        _ => RGBColor(150, 150, 150),
    }
}

fn mark_color(kind: MarkKind) -> RGBColor {
    match kind {
        MarkKind::Gap => RGBColor(200, 0, 200),
        MarkKind::SourceError => RGBColor(200, 0, 0),
        MarkKind::Qmp => RGBColor(0, 90, 200),
        MarkKind::Lifecycle => RGBColor(60, 60, 60),
    }
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    model: &Model,
    panel: &Panel,
    top: bool,
    bottom: bool,
) -> DrawResult<DB> {
    let ymax = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.25 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .margin_left(10)
        .margin_right(20)
        .margin_top(4)
        .caption(&panel.title, (FAMILY, 15))
        .x_label_area_size(if bottom { 35 } else { 18 })
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..model.end_s, 0f64..ymax)?;
    let long = model.end_s >= 100.0;
    let x_fmt = move |v: &f64| {
        if long {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(panel.unit.as_str())
        .y_labels(5)
        .x_labels(12)
        .y_label_formatter(&|v| si(*v))
        .x_label_formatter(&x_fmt)
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(RGBColor(225, 225, 225))
        .label_style((FAMILY, 11));
    if bottom {
        mesh.x_desc("time since episode start (s)");
    }
    mesh.draw()?;

    chart.draw_series(model.bands.iter().map(|b| {
        Rectangle::new(
            [(b.start_s, 0.0), (b.end_s, ymax)],
            phase_color(&b.phase).mix(0.15).filled(),
        )
    }))?;
    // Phase names in every panel's band, so each panel reads on its own.
    chart.draw_series(model.bands.iter().map(|b| {
        Text::new(
            b.phase.clone(),
            (b.start_s + model.end_s * 0.003, ymax * 0.98),
            (FAMILY, 12).into_font().color(&phase_color(&b.phase)),
        )
    }))?;
    // With many markers only the rare kinds get a text label.
    let crowded = model.marks.len() > 40;
    for m in &model.marks {
        let c = mark_color(m.kind);
        let labelled = !crowded || matches!(m.kind, MarkKind::Qmp | MarkKind::Lifecycle);
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(m.t_s, 0.0), (m.t_s, ymax)],
            c.mix(0.7).stroke_width(1),
        )))?;
        if top && labelled {
            chart.draw_series(std::iter::once(Text::new(
                m.label.clone(),
                (m.t_s + model.end_s * 0.002, ymax * 0.86),
                (FAMILY, 10).into_font().color(&c),
            )))?;
        }
    }
    for (i, s) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                super::data::decimate(&s.points, 0.0, model.end_s, WIDTH as usize),
                color.stroke_width(2),
            ))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FAMILY, 11))
            .draw()?;
    }
    Ok(())
}

fn draw_all<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, model: &Model) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(TITLE_HEIGHT);
    title.draw(&Text::new(
        format!(
            "cis490 episode {}  ({:.1} s; phases shaded; markers: gap, source error, QMP events)",
            model.episode_id, model.end_s
        ),
        (12, 12),
        (FAMILY, 17).into_font(),
    ))?;
    let n = model.panels.len().max(1);
    let areas = body.split_evenly((n, 1));
    for (i, (area, panel)) in areas.iter().zip(&model.panels).enumerate() {
        draw_panel(area, model, panel, i == 0, i + 1 == n)?;
    }
    root.present()
}

/// Draw `model` into `path`. The picture is rendered in memory and written with
/// [`write_file_replacing`]: a symlink planted at `path` is replaced, never written through.
pub fn render(model: &Model, path: &Path, format: Format) -> Result<(), Error> {
    register_font()?;
    let size = canvas_size(model.panels.len());
    let draw_err = |e: String| Error::Other(format!("drawing {}: {e}", path.display()));
    let bytes = match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw_all(root, model).map_err(|e| draw_err(e.to_string()))?;
            }
            svg.into_bytes()
        }
        Format::Png => {
            let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                draw_all(root, model).map_err(|e| draw_err(e.to_string()))?;
            }
            encode_png(path, size, &buf)?
        }
    };
    // The picture shows the episode's data: readable by its owner only.
    write_file_replacing(path, &bytes, 0o600)
}

fn encode_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| Error::Other(format!("encoding {}: {e}", path.display()));
    let mut writer = enc.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_format() {
        assert_eq!(si(0.0), "0.0");
        assert_eq!(si(0.5), "0.500");
        assert_eq!(si(1500.0), "1500.0");
        assert_eq!(si(25_000.0), "25.00k");
        assert_eq!(si(3_200_000.0), "3.20M");
    }

    #[test]
    fn font_registers() {
        register_font().unwrap();
        assert_eq!(canvas_size(2), (WIDTH, TITLE_HEIGHT + 2 * PANEL_HEIGHT));
    }
}
