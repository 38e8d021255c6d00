//! Back-off between attempts, and the retry loop, shared by every place that waits out an
//! outage: a consumer or replication session that broke, start-up preparation, one record
//! whose database or registry is away. One copy, so the loops cannot drift apart (two of them
//! once did: one committed past a registry outage, the other did not).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential back-off: each delay doubles the one before, up to a maximum.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// For a session that failed as a whole (a consumer, a replication session, start-up
    /// preparation): 0.5 s doubling to 30 s.
    pub fn session() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// For one record whose registry or database is away: 0.2 s doubling to 10 s, so the
    /// record goes through soon after the outage ends.
    pub fn record() -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
    }

    /// The delay the next wait takes.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Takes the next delay, doubling the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Back to the first delay, after a success that lasted.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Waits the next delay; false if `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        sleep(delay, shutdown).await
    }
}

/// Sleeps `delay`; false if `shutdown` came first.
pub async fn sleep(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Runs `attempt` until it succeeds or fails for good. `transient` classifies each error: a
/// transient one is reported to `on_retry` with the delay before the next attempt and
/// retried; any other is returned. `None` if `shutdown` came first.
pub async fn retry<T, E, F, Fut>(
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, Duration),
    mut attempt: F,
) -> Option<Result<T, E>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(v) => return Some(Ok(v)),
            Err(e) if transient(&e) => {
                on_retry(&e, backoff.peek());
                if !backoff.wait(shutdown).await {
                    return None;
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn delays_double_up_to_the_maximum_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let got: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, vec![ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.peek(), ms(100));
        assert_eq!(Backoff::session().peek(), ms(500));
        assert_eq!(Backoff::record().peek(), ms(200));
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_others_returned() {
        let shutdown = CancellationToken::new();
        let tiny = || Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        let calls = Cell::new(0);
        let retried = Cell::new(0);
        let got = retry(
            &mut tiny(),
            &shutdown,
            |e: &&str| *e == "outage",
            |_, _| retried.set(retried.get() + 1),
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 3 {
                        Err("outage")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got, Some(Ok(3)));
        assert_eq!(retried.get(), 2);

        let got: Option<Result<(), &str>> = retry(
            &mut tiny(),
            &shutdown,
            |e: &&str| *e == "outage",
            |_, _| panic!("a poison record is not retried"),
            || async { Err("poison") },
        )
        .await;
        assert_eq!(got, Some(Err("poison")));
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut long = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let got: Option<Result<(), ()>> = retry(
            &mut long,
            &shutdown,
            |_| true,
            |_, _| {},
            || async { Err(()) },
        )
        .await;
        assert_eq!(got, None);
    }
}
