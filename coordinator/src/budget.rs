//! The cluster's pull budget (`KIP_MAX_NODES_PULLING`): at most so many nodes pull for kip at the
//! same time. An agent asks for a lease before it pulls and renews it while it pulls; a lease that
//! is not renewed expires, so a dead agent gives its slot back on its own. Askers wait in arrival
//! order. [`Leases`] decides (pure, a plain clock); [`LeaseDesk`] makes callers wait for it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// `KIP_MAX_NODES_PULLING`: a number of nodes, or a percentage of the connected ones (rounded
/// up, as a rollout's `maxSurge`), never less than one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Nodes(u32),
    Percent(u32),
}

/// A tenth of the nodes: a 100-node cluster pulls on 10 at a time (30 pulls at the agents'
/// default of 3 each), a small one on one node at a time.
pub const DEFAULT_BUDGET: &str = "10%";

impl Budget {
    /// How many nodes may hold a lease when `connected` agents are connected.
    pub fn slots(self, connected: usize) -> usize {
        match self {
            Budget::Nodes(n) => n as usize,
            Budget::Percent(p) => (connected * p as usize).div_ceil(100),
        }
        .max(1)
    }
}

impl FromStr for Budget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad =
            || format!("`{s}` is not a number of nodes (like 5) or a percentage of the connected nodes (like 10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Budget::Percent(p)),
                Ok(_) => Err(format!("`{s}`: a percentage between 1% and 100%")),
                Err(_) => Err(bad()),
            },
            None => match s.parse::<u32>() {
                Ok(n) if n > 0 => Ok(Budget::Nodes(n)),
                Ok(_) => Err(format!("`{s}`: at least one node must be allowed to pull (100% lifts the limit)")),
                Err(_) => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Nodes(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What an ask got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The node holds the lease until `until` (a renewal moves it on). `waited`: since its first
    /// ask, for a lease it did not hold before; `None` for a renewal.
    Granted { until: Instant, waited: Option<Duration> },
    /// No slot free for this node yet; its place in the queue is kept while it keeps asking.
    Wait,
}

#[derive(Clone, Debug)]
struct Waiter {
    node: String,
    first_asked: Instant,
    last_asked: Instant,
}

/// Who holds a lease and who waits, in arrival order.
#[derive(Debug)]
pub struct Leases {
    ttl: Duration,
    held: BTreeMap<String, Instant>,
    waiting: Vec<Waiter>,
}

impl Leases {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, held: BTreeMap::new(), waiting: Vec::new() }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn in_use(&self) -> usize {
        self.held.len()
    }

    /// Drops leases that were not renewed and waiters that stopped asking (a waiter asks again at
    /// least once per `ttl`). Returns the nodes whose lease expired.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let expired: Vec<String> =
            self.held.iter().filter(|(_, until)| **until <= now).map(|(n, _)| n.clone()).collect();
        for n in &expired {
            self.held.remove(n);
        }
        let ttl = self.ttl;
        self.waiting.retain(|w| now.duration_since(w.last_asked) < ttl);
        expired
    }

    /// `node` asks for a lease with `slots` nodes allowed to pull at once.
    pub fn ask(&mut self, node: &str, now: Instant, slots: usize) -> Answer {
        self.expire(now);
        let until = kip::duration::after(now, self.ttl);
        if let Some(held) = self.held.get_mut(node) {
            *held = until;
            return Answer::Granted { until, waited: None };
        }
        let position = match self.waiting.iter().position(|w| w.node == node) {
            Some(i) => {
                self.waiting[i].last_asked = now;
                i
            }
            None => {
                self.waiting.push(Waiter { node: node.to_string(), first_asked: now, last_asked: now });
                self.waiting.len() - 1
            }
        };
        // First come, first served: only the first free-slot-many waiters may go.
        if position < slots.saturating_sub(self.held.len()) {
            let w = self.waiting.remove(position);
            self.held.insert(node.to_string(), until);
            return Answer::Granted { until, waited: Some(now.duration_since(w.first_asked)) };
        }
        Answer::Wait
    }

    /// `node` stopped waiting (its call went away): it leaves the queue, a lease it holds stays.
    pub fn leave_queue(&mut self, node: &str) {
        self.waiting.retain(|w| w.node != node);
    }

    /// `node` is done pulling (or gave up waiting). Returns true when it held a lease.
    pub fn release(&mut self, node: &str) -> bool {
        self.waiting.retain(|w| w.node != node);
        self.held.remove(node).is_some()
    }

    /// The nodes holding a lease and those waiting, in order (`/status`).
    pub fn snapshot(&self) -> (Vec<String>, Vec<String>) {
        (self.held.keys().cloned().collect(), self.waiting.iter().map(|w| w.node.clone()).collect())
    }

    /// When the next lease runs out (a waiter may go then).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.values().min().copied()
    }
}

/// [`Leases`] behind a lock, with waiting: a call waits up to `wait` for its slot.
pub struct LeaseDesk {
    leases: Mutex<Leases>,
    /// Told when a lease is given back or the budget may have grown.
    freed: Notify,
    wait: Duration,
}

struct LeaveOnDrop<'a> {
    desk: &'a LeaseDesk,
    node: &'a str,
    armed: bool,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut leases) = self.desk.leases.lock() {
                leases.leave_queue(self.node);
            }
            self.desk.freed.notify_waiters();
        }
    }
}

/// What the desk answered one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub granted: bool,
    pub ttl: Duration,
    pub slots: usize,
    pub in_use: usize,
}

impl LeaseDesk {
    /// Leases last `ttl` without renewal; a call waits up to `wait` before answering "not yet".
    pub fn new(ttl: Duration, wait: Duration) -> Self {
        Self { leases: Mutex::new(Leases::new(ttl)), freed: Notify::new(), wait }
    }

    /// Asks for (or renews) `node`'s lease; `slots` is read again at every try, since the
    /// budget follows the configuration and the connected nodes.
    pub async fn acquire(&self, node: &str, slots: impl Fn() -> usize, metrics: &Metrics) -> Reply {
        let deadline = kip::duration::after(Instant::now(), self.wait);
        // A call that goes away while waiting (the agent stopped wanting, or died) must not keep
        // its place at the head of the queue: the next caller would wait for nothing.
        let mut gone = LeaveOnDrop { desk: self, node, armed: true };
        let reply = self.wait_for_slot(node, deadline, &slots, metrics).await;
        gone.armed = false;
        reply
    }

    async fn wait_for_slot(
        &self,
        node: &str,
        deadline: Instant,
        slots: &impl Fn() -> usize,
        metrics: &Metrics,
    ) -> Reply {
        loop {
            // Registered before the state is read, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let slots = slots();
            let (answer, in_use, ttl, next_expiry) = {
                let Ok(mut leases) = self.leases.lock() else {
                    return Reply { granted: false, ttl: self.wait, slots, in_use: 0 };
                };
                let answer = leases.ask(node, Instant::now(), slots);
                (answer, leases.in_use(), leases.ttl(), leases.next_expiry())
            };
            metrics.pull_leases_in_use.set(in_use as i64);
            metrics.pull_lease_budget.set(slots as i64);
            match answer {
                Answer::Granted { waited, .. } => {
                    if let Some(waited) = waited {
                        metrics.pull_lease_wait.observe(waited.as_secs_f64());
                        tracing::debug!(
                            node,
                            waited_ms = waited.as_millis() as u64,
                            in_use,
                            slots,
                            "pull lease granted"
                        );
                    }
                    return Reply { granted: true, ttl, slots, in_use };
                }
                Answer::Wait if Instant::now() >= deadline => return Reply { granted: false, ttl, slots, in_use },
                Answer::Wait => {
                    let wake = next_expiry.map_or(deadline, |t| t.min(deadline));
                    tokio::select! {
                        _ = &mut freed => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    pub fn release(&self, node: &str, metrics: &Metrics) {
        let in_use = match self.leases.lock() {
            Ok(mut leases) => {
                if leases.release(node) {
                    tracing::debug!(node, "pull lease given back");
                }
                leases.in_use()
            }
            Err(_) => return,
        };
        metrics.pull_leases_in_use.set(in_use as i64);
        self.freed.notify_waiters();
    }

    /// Drops the leases that ran out without a renewal (logged: a node that stopped renewing died
    /// or lost the coordinator) and sets the in-use gauge; run before every scrape, so the gauge
    /// does not keep counting a lease nobody holds until the next ask.
    pub fn expire(&self, metrics: &Metrics) {
        let (expired, in_use) = match self.leases.lock() {
            Ok(mut leases) => (leases.expire(Instant::now()), leases.in_use()),
            Err(_) => return,
        };
        for node in &expired {
            tracing::info!(node, "pull lease expired (not renewed)");
        }
        metrics.pull_leases_in_use.set(in_use as i64);
        if !expired.is_empty() {
            self.freed.notify_waiters();
        }
    }

    /// Test support: leases last `ttl` from now on (a renewal then brings the agent a new one).
    pub fn set_ttl(&self, ttl: Duration) {
        if let Ok(mut leases) = self.leases.lock() {
            leases.ttl = ttl;
        }
    }

    /// `/status`: who holds a lease, who waits (in order).
    pub fn to_json(&self, slots: usize) -> serde_json::Value {
        let (held, waiting) = match self.leases.lock() {
            Ok(mut l) => {
                l.expire(Instant::now());
                l.snapshot()
            }
            Err(_) => (vec![], vec![]),
        };
        serde_json::json!({"budget": slots, "held": held, "waiting": waiting})
    }

    /// The budget may have grown (a node connected, the configuration changed): waiters look again.
    pub fn budget_changed(&self) {
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn budgets_parse_and_name_the_problem() {
        assert_eq!("5".parse(), Ok(Budget::Nodes(5)));
        assert_eq!(" 10% ".parse(), Ok(Budget::Percent(10)));
        assert_eq!("100%".parse(), Ok(Budget::Percent(100)));
        for bad in ["0", "0%", "101%", "-1", "ten", "5.5", "%", ""] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        assert!("0".parse::<Budget>().unwrap_err().contains("100% lifts the limit"));
        assert_eq!(Budget::Percent(25).to_string(), "25%");
    }

    #[test]
    fn percentages_round_up_and_never_reach_zero() {
        assert_eq!(Budget::Percent(10).slots(0), 1);
        assert_eq!(Budget::Percent(10).slots(3), 1);
        assert_eq!(Budget::Percent(10).slots(11), 2);
        assert_eq!(Budget::Percent(10).slots(100), 10);
        assert_eq!(Budget::Percent(100).slots(7), 7);
        assert_eq!(Budget::Nodes(2).slots(100), 2);
    }

    #[test]
    fn one_slot_goes_to_the_first_asker_and_then_to_the_next_in_order() {
        let mut l = Leases::new(TTL);
        let t0 = Instant::now();
        assert!(matches!(l.ask("a", t0, 1), Answer::Granted { waited: Some(d), .. } if d.is_zero()));
        assert_eq!(l.ask("b", t0, 1), Answer::Wait);
        assert_eq!(l.ask("c", t0 + Duration::from_secs(1), 1), Answer::Wait);
        // c asks again first: b came first and keeps its place.
        assert_eq!(l.ask("c", t0 + Duration::from_secs(2), 1), Answer::Wait);
        assert!(l.release("a"));
        assert_eq!(l.ask("c", t0 + Duration::from_secs(3), 1), Answer::Wait, "b's turn");
        let b = l.ask("b", t0 + Duration::from_secs(3), 1);
        assert!(matches!(b, Answer::Granted { waited: Some(d), .. } if d == Duration::from_secs(3)), "{b:?}");
        assert_eq!(l.in_use(), 1);
    }

    #[test]
    fn a_holder_renews_and_an_unrenewed_lease_expires() {
        let mut l = Leases::new(TTL);
        let t0 = Instant::now();
        assert!(matches!(l.ask("a", t0, 1), Answer::Granted { .. }));
        let renewed = l.ask("a", t0 + Duration::from_secs(20), 1);
        assert_eq!(renewed, Answer::Granted { until: t0 + Duration::from_secs(50), waited: None });
        assert_eq!(l.next_expiry(), Some(t0 + Duration::from_secs(50)));
        assert_eq!(l.ask("b", t0 + Duration::from_secs(49), 1), Answer::Wait);
        // a died: its lease runs out and b, still asking, gets the slot.
        assert!(matches!(l.ask("b", t0 + Duration::from_secs(50), 1), Answer::Granted { .. }));
        assert_eq!(l.in_use(), 1);
        assert!(!l.release("a"), "a's lease is gone");
    }

    #[test]
    fn waiters_that_stop_asking_lose_their_place() {
        let mut l = Leases::new(TTL);
        let t0 = Instant::now();
        assert!(matches!(l.ask("a", t0, 1), Answer::Granted { .. }));
        assert_eq!(l.ask("gone", t0, 1), Answer::Wait);
        assert_eq!(l.ask("b", t0, 1), Answer::Wait);
        l.release("a");
        // "gone" never asks again; after a ttl b is first.
        assert_eq!(l.ask("b", t0 + Duration::from_secs(10), 1), Answer::Wait);
        assert!(matches!(l.ask("b", t0 + TTL + Duration::from_secs(1), 1), Answer::Granted { .. }));
    }

    #[test]
    fn a_larger_budget_lets_several_go_and_a_smaller_one_grants_nothing_new() {
        let mut l = Leases::new(TTL);
        let t0 = Instant::now();
        for n in ["a", "b", "c"] {
            assert!(matches!(l.ask(n, t0, 3), Answer::Granted { .. }), "{n}");
        }
        assert_eq!(l.ask("d", t0, 3), Answer::Wait);
        // The budget shrank to 1 while three hold leases: they keep them, nobody new goes.
        l.release("a");
        assert_eq!(l.ask("d", t0, 1), Answer::Wait);
        assert!(matches!(l.ask("b", t0, 1), Answer::Granted { waited: None, .. }), "holders renew");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_is_granted_when_the_holder_gives_back() {
        let desk = std::sync::Arc::new(LeaseDesk::new(TTL, Duration::from_secs(10)));
        let metrics = std::sync::Arc::new(Metrics::new());
        assert!(desk.acquire("a", || 1, &metrics).await.granted);
        let waiter = {
            let (desk, metrics) = (desk.clone(), metrics.clone());
            tokio::spawn(async move { desk.acquire("b", || 1, &metrics).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished(), "b waits while a holds the only slot");
        desk.release("a", &metrics);
        let reply = waiter.await.unwrap();
        assert_eq!(reply, Reply { granted: true, ttl: TTL, slots: 1, in_use: 1 });
        // Nobody gives back: the call answers "not yet" after its wait.
        let started = Instant::now();
        assert!(!desk.acquire("c", || 1, &metrics).await.granted);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
