//! Inline SVG charts over one stats window: the replay rate and the conflicts per bucket.

use idemgate_protocol::admin::{replay_rate, StatsWindow};
use leptos::prelude::*;

use crate::chart::{line_path, line_points, nice_ceiling, stacked_bars};
use crate::components::time::local_time;
use crate::format::{duration_ms, percent};

const W: f64 = 560.0;
const H: f64 = 140.0;
const LEFT: f64 = 44.0;
const TOP: f64 = 8.0;

fn view_box() -> String {
    format!("0 0 {} {}", W + LEFT + 8.0, H + TOP + 22.0)
}

/// X-axis labels: the first bucket's start and the window's end, local time.
fn x_labels(window: &StatsWindow) -> (String, String) {
    let first = window.series.first().map(|b| b.start_ms);
    let last = window.series.last().map(|b| {
        b.start_ms
            .saturating_add(window.bucket_s.saturating_mul(1000))
    });
    (
        first.map(local_time).unwrap_or_default(),
        last.map(local_time).unwrap_or_default(),
    )
}

/// Replay rate (replays / (replays + executions)) per bucket, 0–100 %.
#[component]
pub fn ReplayRateChart(
    /// The window to draw.
    #[prop(into)]
    window: Signal<StatsWindow>,
) -> impl IntoView {
    let path = move || {
        window.with(|w| {
            let values: Vec<Option<f64>> =
                w.series.iter().map(|b| replay_rate(&b.counts)).collect();
            line_path(&values, 1.0, W, H)
        })
    };
    let dots = move || {
        window.with(|w| {
            let values: Vec<Option<f64>> =
                w.series.iter().map(|b| replay_rate(&b.counts)).collect();
            line_points(&values, 1.0, W, H)
                .into_iter()
                .map(|(x, y)| view! { <circle class="dot replay" cx=x cy=y r="3"></circle> })
                .collect_view()
        })
    };
    let labels = move || window.with(x_labels);
    let summary = move || {
        window.with(|w| {
            format!(
                "Replay rate per {} bucket; {} over the window",
                duration_ms(i64::try_from(w.bucket_s.saturating_mul(1000)).unwrap_or(0)),
                percent(w.replay_rate)
            )
        })
    };
    view! {
        <svg class="chart" id="chart-replay-rate" viewBox=view_box() role="img" preserveAspectRatio="xMidYMid meet">
            <title>{summary}</title>
            <g transform=format!("translate({LEFT},{TOP})")>
                <line class="grid" x1="0" x2=W y1="0" y2="0"></line>
                <line class="grid" x1="0" x2=W y1=H / 2.0 y2=H / 2.0></line>
                <line class="axis" x1="0" x2=W y1=H y2=H></line>
                <text class="tick" x="-6" y="4" text-anchor="end">"100 %"</text>
                <text class="tick" x="-6" y=H / 2.0 + 4.0 text-anchor="end">"50 %"</text>
                <text class="tick" x="-6" y=H + 4.0 text-anchor="end">"0 %"</text>
                <path class="line replay" d=path></path>
                {dots}
                <text class="tick" x="0" y=H + 18.0>{move || labels().0}</text>
                <text class="tick" x=W y=H + 18.0 text-anchor="end">{move || labels().1}</text>
            </g>
        </svg>
    }
}

/// In-flight conflicts (409) and mismatches (422) per bucket, stacked.
#[component]
pub fn ConflictsChart(
    /// The window to draw.
    #[prop(into)]
    window: Signal<StatsWindow>,
) -> impl IntoView {
    let geometry = move || {
        window.with(|w| {
            let lower: Vec<u64> = w
                .series
                .iter()
                .map(|b| b.counts.in_flight_conflicts)
                .collect();
            let upper: Vec<u64> = w.series.iter().map(|b| b.counts.mismatches).collect();
            let peak = lower
                .iter()
                .zip(&upper)
                .map(|(a, b)| a.saturating_add(*b))
                .max()
                .unwrap_or(0);
            let max = nice_ceiling(peak as f64);
            (max, stacked_bars(&lower, &upper, max, W, H))
        })
    };
    let labels = move || window.with(x_labels);
    view! {
        <svg class="chart" id="chart-conflicts" viewBox=view_box() role="img" preserveAspectRatio="xMidYMid meet">
            <title>"In-flight conflicts (409) and mismatches (422) per bucket"</title>
            <g transform=format!("translate({LEFT},{TOP})")>
                <line class="grid" x1="0" x2=W y1="0" y2="0"></line>
                <line class="axis" x1="0" x2=W y1=H y2=H></line>
                <text class="tick" x="-6" y="4" text-anchor="end">{move || geometry().0.to_string()}</text>
                <text class="tick" x="-6" y=H + 4.0 text-anchor="end">"0"</text>
                {move || {
                    geometry()
                        .1
                        .into_iter()
                        .map(|(_, lo, up)| {
                            view! {
                                {lo.map(|b| view! { <rect class="bar conflict" x=b.x y=b.y width=b.w height=b.h></rect> })}
                                {up.map(|b| view! { <rect class="bar mismatch" x=b.x y=b.y width=b.w height=b.h></rect> })}
                            }
                        })
                        .collect_view()
                }}
                <text class="tick" x="0" y=H + 18.0>{move || labels().0}</text>
                <text class="tick" x=W y=H + 18.0 text-anchor="end">{move || labels().1}</text>
            </g>
        </svg>
    }
}
