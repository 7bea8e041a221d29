//! Geometry for the inline SVG charts (pure, unit-tested on the host). Coordinates are in
//! the chart's `viewBox` units: x grows right, y grows down, the plot is `width` x
//! `height`.

/// One rectangle of a bar chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

/// The smallest "nice" number (1, 2 or 5 times a power of ten) at or above `v`; at least 1.
pub fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 1.0 {
        return 1.0;
    }
    let mut step = 1.0_f64;
    while step * 10.0 < v {
        step *= 10.0;
    }
    for m in [1.0, 2.0, 5.0, 10.0] {
        if step * m >= v {
            return step * m;
        }
    }
    step * 10.0
}

/// The x coordinate of the centre of slot `i` of `n` equal slots across `width`.
fn slot_centre(i: usize, n: usize, width: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let slot = width / n as f64;
    slot * (i as f64 + 0.5)
}

/// An SVG path (`M x y L x y ...`) through `values` scaled to `0..=max`, one point per
/// slot; a `None` breaks the line (the next value starts a new `M`). Values above `max` are
/// clamped. Empty when there is nothing to draw.
pub fn line_path(values: &[Option<f64>], max: f64, width: f64, height: f64) -> String {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let mut out = String::new();
    let mut pen_down = false;
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) if v.is_finite() => {
                let x = slot_centre(i, values.len(), width);
                let y = height - (v.clamp(0.0, max) / max) * height;
                out.push_str(if pen_down {
                    " L"
                } else if out.is_empty() {
                    "M"
                } else {
                    " M"
                });
                out.push_str(&format!("{x:.1} {y:.1}"));
                pen_down = true;
            }
            _ => pen_down = false,
        }
    }
    out
}

/// The points of [`line_path`] (`(x, y)` of each finite value), for dots that stay
/// visible where a value has no neighbour to draw a line to.
pub fn line_points(values: &[Option<f64>], max: f64, width: f64, height: f64) -> Vec<(f64, f64)> {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            v.filter(|v| v.is_finite()).map(|v| {
                (
                    slot_centre(i, values.len(), width),
                    height - (v.clamp(0.0, max) / max) * height,
                )
            })
        })
        .collect()
}

/// Bars for `values` scaled to `0..=max`, one per slot with a small gap; zero values get no
/// bar.
pub fn bars(values: &[u64], max: f64, width: f64, height: f64) -> Vec<(usize, Bar)> {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let n = values.len();
    if n == 0 {
        return Vec::new();
    }
    let slot = width / n as f64;
    let w = (slot * 0.7).max(1.0);
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0)
        .map(|(i, v)| {
            let h = ((*v as f64).min(max) / max) * height;
            (
                i,
                Bar {
                    x: slot_centre(i, n, width) - w / 2.0,
                    y: height - h,
                    w,
                    h,
                },
            )
        })
        .collect()
}

/// Stacked bars: for each slot the `lower` bar starts at the baseline and the `upper` bar
/// sits on top of it. Returns `(slot, lower, upper)`; a zero part has no bar.
pub fn stacked_bars(
    lower: &[u64],
    upper: &[u64],
    max: f64,
    width: f64,
    height: f64,
) -> Vec<(usize, Option<Bar>, Option<Bar>)> {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let n = lower.len().max(upper.len());
    if n == 0 {
        return Vec::new();
    }
    let slot = width / n as f64;
    let w = (slot * 0.7).max(1.0);
    (0..n)
        .filter_map(|i| {
            let lo = lower.get(i).copied().unwrap_or(0);
            let up = upper.get(i).copied().unwrap_or(0);
            if lo == 0 && up == 0 {
                return None;
            }
            let x = slot_centre(i, n, width) - w / 2.0;
            let scale = |v: u64| ((v as f64).min(max) / max) * height;
            let lo_h = scale(lo);
            let up_h = scale(lo + up) - lo_h;
            let lower_bar = (lo > 0).then_some(Bar {
                x,
                y: height - lo_h,
                w,
                h: lo_h,
            });
            let upper_bar = (up > 0).then_some(Bar {
                x,
                y: height - lo_h - up_h,
                w,
                h: up_h,
            });
            Some((i, lower_bar, upper_bar))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(200.0), 200.0);
        assert_eq!(nice_ceiling(201.0), 500.0);
    }

    #[test]
    fn line_breaks_at_gaps_and_scales() {
        let p = line_path(&[Some(0.0), Some(1.0), None, Some(0.5)], 1.0, 400.0, 100.0);
        assert_eq!(p, "M50.0 100.0 L150.0 0.0 M350.0 50.0");
        assert_eq!(line_path(&[None, None], 1.0, 100.0, 100.0), "");
        assert_eq!(line_path(&[Some(5.0)], 1.0, 100.0, 100.0), "M50.0 0.0");
    }

    #[test]
    fn points_follow_the_line() {
        let p = line_points(&[Some(0.0), None, Some(1.0)], 1.0, 300.0, 100.0);
        assert_eq!(p, vec![(50.0, 100.0), (250.0, 0.0)]);
    }

    #[test]
    fn bars_skip_zeros() {
        let b = bars(&[0, 10, 5], 10.0, 300.0, 100.0);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].0, 1);
        assert!((b[0].1.h - 100.0).abs() < 1e-9);
        assert!((b[1].1.y - 50.0).abs() < 1e-9);
    }

    #[test]
    fn stacked_bars_sit_on_each_other() {
        let s = stacked_bars(&[2, 0, 0], &[2, 4, 0], 4.0, 300.0, 100.0);
        assert_eq!(s.len(), 2);
        let (_, lo, up) = s[0];
        let (lo, up) = (lo.unwrap(), up.unwrap());
        assert!((lo.h - 50.0).abs() < 1e-9);
        assert!((up.y + up.h - lo.y).abs() < 1e-9);
        assert!(s[1].1.is_none());
    }
}
