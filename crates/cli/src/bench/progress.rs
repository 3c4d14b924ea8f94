//! The progress line of `dps bench` (on a terminal): devices done, assigned, failed, rate.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Redraw the progress line every 200 ms (until aborted); does nothing unless `enabled`.
pub(super) fn spawn_progress(
    total: usize,
    ok: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
    started: Instant,
    enabled: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let (o, f) = (ok.load(Ordering::Relaxed), fail.load(Ordering::Relaxed));
            eprint!("\r\x1b[2K{}", progress_line(total, o, f, started.elapsed()));
            let _ = std::io::stderr().flush();
        }
    })
}

/// `[#####.....] 50/100  ok 49  failed 1  123.4/s  2.0s`
fn progress_line(total: usize, ok: usize, fail: usize, elapsed: Duration) -> String {
    let done = ok + fail;
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    let rate = if elapsed.as_secs_f64() > 0.0 {
        done as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    format!(
        "[{}{}] {done}/{total}  ok {ok}  failed {fail}  {rate:.1}/s  {:.1}s",
        "#".repeat(filled),
        ".".repeat(width - filled),
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_renders() {
        let l = progress_line(100, 40, 10, Duration::from_secs(2));
        assert!(l.starts_with("[###############..............."));
        assert!(l.contains("50/100"));
        assert!(l.contains("25.0/s"));
        assert!(progress_line(0, 0, 0, Duration::ZERO).contains("0/0"));
    }
}
