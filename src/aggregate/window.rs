//! The window engine: per-partition event-time windows, watermarks, lateness and the offset each
//! partition may commit. Pure state: no I/O, wall-clock `now` is passed in, so tests control time.
//!
//! Rules (all per input partition, because a partition is the unit of replay and of ownership):
//! - Windows start at multiples of `advance` and last `size` (tumbling when equal, else hopping).
//! - watermark = max event time seen − allowed lateness; a window *closes* (is emitted) when the
//!   watermark reaches its end, or when the partition saw no event for `idle_timeout`.
//! - A closed window still accepts events until it is *final*: its end ≤ horizon, where
//!   horizon = watermark − grace (raised further by cap evictions). Each accepted late event marks
//!   the window dirty and it is re-emitted. Events whose every window is final are too late.
//! - The horizon only moves on `apply` (in offset order), never on wall-clock ticks, so a replay
//!   of the same offsets with the same starting horizon accepts exactly the same events.
//! - Committable offset = min(first offset of every retained window, next offset); the stage
//!   runtime further holds it below any dead letter still in flight. A window is dropped only when final and every emission of it is acknowledged, so a
//!   restart from the committed offset (with the committed horizon) rebuilds every window that
//!   can still change, from all of its events.
//! - Cap: when more than `max_open_windows` (name × function × window) are open, the oldest window
//!   start of the partition holding it is force-finalized: emitted as is, later events for it are
//!   dead-lettered as too late. Memory stays bounded; only overloaded windows lose exactness.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::event::Event;
use super::function::{Accumulator, Function};
use crate::stage::PartitionId;

/// Window shape and lateness policy; durations of event time in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub size_ms: i64,
    /// Equal to `size_ms` for tumbling windows; smaller for hopping windows.
    pub advance_ms: i64,
    pub allowed_lateness_ms: i64,
    pub grace_ms: i64,
    /// Wall-clock quiet time after which a partition's windows are emitted anyway.
    pub idle_timeout: Duration,
    pub max_open_windows: usize,
}

/// What `apply` did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Added to its window(s); `late` when one of them had already closed (it will be re-emitted).
    Accepted { late: bool },
    /// Every window of the event is final: dead-letter it.
    TooLate,
    /// The partition is not assigned to this instance (a message from before a rebalance).
    Unassigned,
}

/// One aggregate to write: a (name, function, window) with its value and event count.
#[derive(Debug, Clone, PartialEq)]
pub struct Emission {
    pub partition: PartitionId,
    pub name: String,
    pub function: Function,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub value: f64,
    pub count: u64,
    /// The newest Kafka record timestamp among the events that contributed (end-to-end latency).
    pub newest_record_ms: Option<i64>,
}

/// What a partition may commit: the next offset to read on restart and the horizon to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub next_offset: i64,
    pub horizon_ms: i64,
}

#[derive(Debug, Default)]
struct Series {
    accumulator: Accumulator,
    dirty: bool,
    newest_record_ms: Option<i64>,
}

#[derive(Debug)]
struct Slot {
    /// The first offset that contributed: the replay must start at or before it.
    first_offset: i64,
    closed: bool,
    finalized: bool,
    /// Emissions handed out and not yet acknowledged by the sink.
    unacked: u32,
    /// By name, then the (usually single) function used with that name; lookups by `&str`
    /// avoid allocating a key per event.
    series: HashMap<String, Vec<(Function, Series)>>,
    series_count: usize,
}

#[derive(Debug)]
struct PartitionWindows {
    slots: BTreeMap<i64, Slot>,
    max_event_ms: Option<i64>,
    horizon_ms: i64,
    next_offset: Option<i64>,
    last_activity: Option<Instant>,
}

impl PartitionWindows {
    fn new(horizon_ms: Option<i64>) -> Self {
        PartitionWindows {
            slots: BTreeMap::new(),
            max_event_ms: None,
            horizon_ms: horizon_ms.unwrap_or(i64::MIN),
            next_offset: None,
            last_activity: None,
        }
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        let next = self.next_offset?;
        let first_retained = self.slots.values().map(|s| s.first_offset).min();
        let next_offset = [Some(next), first_retained]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next);
        Some(Checkpoint {
            next_offset,
            horizon_ms: self.horizon_ms,
        })
    }

    /// Marks windows ending at or before `horizon` final; returns how many series stopped being open.
    fn finalize(&mut self, horizon: i64, size_ms: i64) -> usize {
        if horizon <= self.horizon_ms {
            return 0;
        }
        self.horizon_ms = horizon;
        let mut closed_series = 0;
        for (_, slot) in self.slots.range_mut(..=horizon.saturating_sub(size_ms)) {
            if !slot.finalized {
                slot.finalized = true;
                slot.closed = true;
                closed_series += slot.series_count;
            }
        }
        closed_series
    }

    fn open_series(&self) -> usize {
        self.slots
            .values()
            .filter(|s| !s.finalized)
            .map(|s| s.series_count)
            .sum()
    }

    fn purge(&mut self) {
        self.slots.retain(|_, slot| {
            !(slot.finalized
                && slot.unacked == 0
                && slot.series.values().flatten().all(|(_, s)| !s.dirty))
        });
    }
}

/// All windows of the partitions assigned to this instance.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    partitions: BTreeMap<PartitionId, PartitionWindows>,
    /// Series-windows not yet final, over all partitions: what the cap limits.
    open: usize,
    evicted: u64,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        assert!(config.size_ms > 0 && config.advance_ms > 0 && config.advance_ms <= config.size_ms);
        Engine {
            config,
            partitions: BTreeMap::new(),
            open: 0,
            evicted: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Starts (or restarts) a partition with the horizon saved in its last commit.
    pub fn assign(&mut self, partition: PartitionId, horizon_ms: Option<i64>) {
        self.revoke(&partition);
        self.partitions
            .insert(partition, PartitionWindows::new(horizon_ms));
    }

    /// Drops a partition's windows; the returned checkpoint makes the next owner rebuild them.
    pub fn revoke(&mut self, partition: &PartitionId) -> Option<Checkpoint> {
        let state = self.partitions.remove(partition)?;
        self.open -= state.open_series();
        state.checkpoint()
    }

    pub fn is_assigned(&self, partition: &PartitionId) -> bool {
        self.partitions.contains_key(partition)
    }

    /// Event start times of the windows containing `time_ms`, newest first.
    pub fn window_starts(&self, time_ms: i64) -> impl Iterator<Item = i64> {
        let (size, advance) = (self.config.size_ms, self.config.advance_ms);
        let last = time_ms.div_euclid(advance) * advance;
        (0..)
            .map(move |k| last - k * advance)
            .take_while(move |start| start + size > time_ms)
    }

    /// Adds the event at `offset` (offsets of a partition arrive in increasing order).
    pub fn apply(
        &mut self,
        partition: &PartitionId,
        offset: i64,
        event: &Event,
        now: Instant,
    ) -> Outcome {
        let config = &self.config;
        let Some(state) = self.partitions.get_mut(partition) else {
            return Outcome::Unassigned;
        };
        state.next_offset = Some(offset + 1);
        state.last_activity = Some(now);
        let max_event = state
            .max_event_ms
            .map_or(event.time_ms, |m| m.max(event.time_ms));
        state.max_event_ms = Some(max_event);
        let watermark = max_event.saturating_sub(config.allowed_lateness_ms);
        self.open -= state.finalize(watermark.saturating_sub(config.grace_ms), config.size_ms);

        let (size, advance) = (config.size_ms, config.advance_ms);
        let last = event.time_ms.div_euclid(advance) * advance;
        let mut accepted = false;
        let mut late = false;
        let mut start = last;
        while start + size > event.time_ms {
            let end = start + size;
            if end > state.horizon_ms {
                accepted = true;
                let slot = state.slots.entry(start).or_insert_with(|| Slot {
                    first_offset: offset,
                    closed: false,
                    finalized: false,
                    unacked: 0,
                    series: HashMap::new(),
                    series_count: 0,
                });
                late |= slot.closed || end <= watermark;
                let by_function = match slot.series.get_mut(event.name.as_str()) {
                    Some(v) => v,
                    None => slot.series.entry(event.name.clone()).or_default(),
                };
                let series = match by_function.iter().position(|(f, _)| *f == event.function) {
                    Some(i) => &mut by_function[i].1,
                    None => {
                        by_function.push((event.function, Series::default()));
                        slot.series_count += 1;
                        self.open += 1;
                        &mut by_function.last_mut().expect("just pushed").1
                    }
                };
                series.accumulator.add(event.function, event.value);
                series.dirty = true;
                series.newest_record_ms = series.newest_record_ms.max(event.record_ms);
            }
            start -= advance;
        }
        if self.open > self.config.max_open_windows {
            self.evict_oldest();
        }
        if accepted {
            Outcome::Accepted { late }
        } else {
            Outcome::TooLate
        }
    }

    /// Records an offset that contributes to no window (it is dead-lettered).
    pub fn skip(&mut self, partition: &PartitionId, offset: i64) {
        if let Some(state) = self.partitions.get_mut(partition) {
            state.next_offset = Some(offset + 1);
        }
    }

    /// Force-finalizes the oldest open window start (over all partitions) until under the cap.
    fn evict_oldest(&mut self) {
        while self.open > self.config.max_open_windows {
            let victim = self
                .partitions
                .iter()
                .filter_map(|(id, state)| {
                    let (start, _) = state.slots.iter().find(|(_, s)| !s.finalized)?;
                    Some((*start, id.clone()))
                })
                .min();
            let Some((start, id)) = victim else { return };
            let state = self.partitions.get_mut(&id).expect("victim exists");
            self.open -= state.finalize(start + self.config.size_ms, self.config.size_ms);
            self.evicted += 1;
        }
    }

    /// Closes windows whose end the watermark passed (or whose partition is idle) and returns
    /// every changed series of every closed window; call `acknowledge` once they are durable.
    pub fn take_emissions(&mut self, now: Instant) -> Vec<Emission> {
        let config = &self.config;
        let mut emissions = Vec::new();
        for (id, state) in &mut self.partitions {
            let idle = state
                .last_activity
                .is_some_and(|t| now.saturating_duration_since(t) >= config.idle_timeout);
            let watermark = state
                .max_event_ms
                .map(|m| m.saturating_sub(config.allowed_lateness_ms));
            for (start, slot) in &mut state.slots {
                let end = start + config.size_ms;
                if !slot.closed && (idle || watermark.is_some_and(|w| end <= w)) {
                    slot.closed = true;
                }
                if !slot.closed {
                    continue;
                }
                for (name, by_function) in &mut slot.series {
                    for (function, series) in by_function.iter_mut().filter(|(_, s)| s.dirty) {
                        series.dirty = false;
                        slot.unacked += 1;
                        emissions.push(Emission {
                            partition: id.clone(),
                            name: name.clone(),
                            function: *function,
                            window_start_ms: *start,
                            window_end_ms: end,
                            value: series.accumulator.value(*function),
                            count: series.accumulator.count(),
                            newest_record_ms: series.newest_record_ms,
                        });
                    }
                }
            }
            state.purge();
        }
        emissions
    }

    /// The sink made `emissions` durable: final windows with nothing outstanding are dropped.
    pub fn acknowledge(&mut self, emissions: &[Emission]) {
        for emission in emissions {
            // Unknown partitions or windows: revoked since; the new owner rebuilds them.
            if let Some(slot) = self
                .partitions
                .get_mut(&emission.partition)
                .and_then(|s| s.slots.get_mut(&emission.window_start_ms))
            {
                slot.unacked = slot.unacked.saturating_sub(1);
            }
        }
        for state in self.partitions.values_mut() {
            state.purge();
        }
    }

    /// The checkpoint of every assigned partition that has consumed something.
    pub fn checkpoints(&self) -> Vec<(PartitionId, Checkpoint)> {
        self.partitions
            .iter()
            .filter_map(|(id, state)| Some((id.clone(), state.checkpoint()?)))
            .collect()
    }

    /// Series-windows not yet final (what `max_open_windows` caps).
    pub fn open_windows(&self) -> usize {
        self.open
    }

    /// Windows force-finalized by the cap since start.
    pub fn evicted_windows(&self) -> u64 {
        self.evicted
    }

    /// The lowest watermark over partitions that have seen events (event time, ms).
    pub fn min_watermark_ms(&self) -> Option<i64> {
        self.partitions
            .values()
            .filter_map(|s| s.max_event_ms)
            .min()
            .map(|m| m.saturating_sub(self.config.allowed_lateness_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn p(n: i32) -> PartitionId {
        PartitionId {
            topic: "events_in".into(),
            partition: n,
        }
    }

    fn ev(name: &str, function: Function, value: f64, time_ms: i64) -> Event {
        Event {
            name: name.into(),
            function,
            value,
            time_ms,
            record_ms: None,
        }
    }

    fn config() -> EngineConfig {
        EngineConfig {
            size_ms: 1000,
            advance_ms: 1000,
            allowed_lateness_ms: 0,
            grace_ms: 0,
            idle_timeout: Duration::from_secs(10),
            max_open_windows: 1000,
        }
    }

    /// (name, function, start) → (value, count), the way an upserting sink keeps it.
    type Table = HashMap<(String, Function, i64), (f64, u64)>;

    fn upsert(table: &mut Table, emissions: &[Emission]) {
        for e in emissions {
            table.insert(
                (e.name.clone(), e.function, e.window_start_ms),
                (e.value, e.count),
            );
        }
    }

    fn flush(engine: &mut Engine, table: &mut Table, now: Instant) -> Vec<Emission> {
        let emissions = engine.take_emissions(now);
        upsert(table, &emissions);
        engine.acknowledge(&emissions);
        emissions
    }

    #[test]
    fn out_of_order_events_within_lateness_land_in_their_window() {
        let t0 = Instant::now();
        let mut engine = Engine::new(EngineConfig {
            allowed_lateness_ms: 500,
            ..config()
        });
        engine.assign(p(0), None);
        let events = [
            (100, 1.0),
            (1200, 2.0),
            (900, 3.0),
            (1400, 4.0),
            (1600, 5.0),
        ];
        for (offset, (time, value)) in events.iter().enumerate() {
            let outcome = engine.apply(
                &p(0),
                offset as i64,
                &ev("a", Function::Sum, *value, *time),
                t0,
            );
            assert_eq!(outcome, Outcome::Accepted { late: false });
        }
        let mut table = Table::new();
        // Watermark 1100: window [0,1000) closed with the out-of-order 900 in it.
        let emitted = flush(&mut engine, &mut table, t0);
        assert_eq!(emitted.len(), 1);
        assert_eq!(table[&("a".into(), Function::Sum, 0)], (4.0, 2));
        // Offsets 0 and 2 are done; [1000,2000) still holds offset 1.
        assert_eq!(engine.checkpoints()[0].1.next_offset, 1);
        assert_eq!(engine.open_windows(), 1);
    }

    #[test]
    fn late_events_within_grace_re_emit_and_after_grace_are_too_late() {
        let t0 = Instant::now();
        let mut engine = Engine::new(EngineConfig {
            grace_ms: 2000,
            ..config()
        });
        engine.assign(p(0), None);
        let mut table = Table::new();
        engine.apply(&p(0), 0, &ev("a", Function::Count, 0.0, 500), t0);
        engine.apply(&p(0), 1, &ev("a", Function::Count, 0.0, 1500), t0);
        flush(&mut engine, &mut table, t0);
        assert_eq!(table[&("a".into(), Function::Count, 0)], (1.0, 1));
        // Late but within grace (horizon = 1500 - 2000): accepted and re-emitted.
        assert_eq!(
            engine.apply(&p(0), 2, &ev("a", Function::Count, 0.0, 700), t0),
            Outcome::Accepted { late: true }
        );
        let emitted = flush(&mut engine, &mut table, t0);
        assert_eq!(emitted.len(), 1);
        assert_eq!(table[&("a".into(), Function::Count, 0)], (2.0, 2));
        // The watermark moves to 3500: [0,1000) is final (horizon 1500 ≥ 1000).
        engine.apply(&p(0), 3, &ev("a", Function::Count, 0.0, 3500), t0);
        assert_eq!(
            engine.apply(&p(0), 4, &ev("a", Function::Count, 0.0, 999), t0),
            Outcome::TooLate
        );
        flush(&mut engine, &mut table, t0);
        assert_eq!(table[&("a".into(), Function::Count, 0)], (2.0, 2));
        // The final window was dropped, so the checkpoint moved past its offsets.
        assert_eq!(engine.checkpoints()[0].1.next_offset, 1);
        assert_eq!(engine.checkpoints()[0].1.horizon_ms, 1500);
    }

    #[test]
    fn idle_partitions_emit_on_wall_clock_timeout() {
        let t0 = Instant::now();
        let mut engine = Engine::new(config());
        engine.assign(p(0), None);
        engine.apply(&p(0), 0, &ev("quiet", Function::Max, 7.0, 100), t0);
        engine.apply(&p(0), 1, &ev("quiet", Function::Max, 9.0, 200), t0);
        let mut table = Table::new();
        assert!(flush(&mut engine, &mut table, t0 + Duration::from_secs(9)).is_empty());
        let emitted = flush(&mut engine, &mut table, t0 + Duration::from_secs(10));
        assert_eq!(emitted.len(), 1);
        assert_eq!(table[&("quiet".into(), Function::Max, 0)], (9.0, 2));
        // Not final yet: more data for the same window updates it.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            engine.apply(&p(0), 2, &ev("quiet", Function::Max, 11.0, 300), later),
            Outcome::Accepted { late: true }
        );
        flush(&mut engine, &mut table, later + Duration::from_secs(10));
        assert_eq!(table[&("quiet".into(), Function::Max, 0)], (11.0, 3));
    }

    #[test]
    fn hopping_windows_count_an_event_in_each_window_that_covers_it() {
        let t0 = Instant::now();
        let mut engine = Engine::new(EngineConfig {
            size_ms: 3000,
            advance_ms: 1000,
            ..config()
        });
        assert_eq!(
            engine.window_starts(2500).collect::<Vec<_>>(),
            vec![2000, 1000, 0]
        );
        assert_eq!(
            engine.window_starts(-1).collect::<Vec<_>>(),
            vec![-1000, -2000, -3000]
        );
        engine.assign(p(0), None);
        for (offset, time) in [0, 1500, 2500, 3500].into_iter().enumerate() {
            engine.apply(&p(0), offset as i64, &ev("h", Function::Sum, 1.0, time), t0);
        }
        engine.apply(&p(0), 4, &ev("h", Function::Sum, 0.0, 10_000), t0);
        let mut table = Table::new();
        flush(&mut engine, &mut table, t0);
        let sum = |start: i64| table[&("h".into(), Function::Sum, start)].0;
        assert_eq!(sum(-2000), 1.0); // [-2000, 1000): 0
        assert_eq!(sum(0), 3.0); // [0, 3000): 0, 1500, 2500
        assert_eq!(sum(1000), 3.0); // [1000, 4000): 1500, 2500, 3500
        assert_eq!(sum(3000), 1.0); // [3000, 6000): 3500
    }

    #[test]
    fn cap_force_emits_the_oldest_window_and_rejects_its_later_events() {
        let t0 = Instant::now();
        let mut engine = Engine::new(EngineConfig {
            max_open_windows: 2,
            grace_ms: 60_000,
            allowed_lateness_ms: 60_000,
            ..config()
        });
        engine.assign(p(0), None);
        engine.assign(p(1), None);
        engine.apply(&p(0), 0, &ev("a", Function::Sum, 1.0, 100), t0);
        engine.apply(&p(1), 0, &ev("b", Function::Sum, 2.0, 1100), t0);
        assert_eq!(engine.open_windows(), 2);
        // A third open series-window: the oldest (p0, [0,1000)) is force-finalized.
        engine.apply(&p(1), 1, &ev("c", Function::Sum, 3.0, 2100), t0);
        assert_eq!(engine.open_windows(), 2);
        assert_eq!(engine.evicted_windows(), 1);
        assert_eq!(
            engine.apply(&p(0), 1, &ev("a", Function::Sum, 1.0, 200), t0),
            Outcome::TooLate
        );
        let mut table = Table::new();
        let emitted = flush(&mut engine, &mut table, t0);
        assert_eq!(emitted.len(), 1);
        assert_eq!(table[&("a".into(), Function::Sum, 0)], (1.0, 1));
        let p0 = engine
            .checkpoints()
            .into_iter()
            .find(|(id, _)| *id == p(0))
            .unwrap()
            .1;
        assert_eq!(
            p0,
            Checkpoint {
                next_offset: 2,
                horizon_ms: 1000
            }
        );
    }

    #[test]
    fn skipped_offsets_advance_the_checkpoint_and_unassigned_partitions_are_ignored() {
        let t0 = Instant::now();
        let mut engine = Engine::new(config());
        engine.assign(p(0), None);
        engine.skip(&p(0), 0);
        assert_eq!(engine.checkpoints()[0].1.next_offset, 1);
        assert_eq!(
            engine.apply(&p(9), 0, &ev("x", Function::Sum, 1.0, 0), t0),
            Outcome::Unassigned
        );
    }

    /// Crash anywhere, restart from the last checkpoint: the final table equals a run without
    /// a crash, and (with no too-late events) the offline computation.
    #[test]
    fn restart_from_any_checkpoint_gives_the_same_final_results() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..100 {
            let lateness = [0, 300, 5000][round % 3];
            let cfg = EngineConfig {
                allowed_lateness_ms: lateness,
                grace_ms: [0, 700][round % 2],
                advance_ms: [1000, 500][round % 2],
                ..config()
            };
            let events: Vec<Event> = (0..300)
                .map(|i| {
                    let time = i * 20 + rng.random_range(-400..400);
                    let f = Function::ALL[rng.random_range(0..Function::ALL.len())];
                    let name = format!("s{}", rng.random_range(0..4));
                    ev(&name, f, rng.random_range(0..10_000) as f64 / 100.0, time)
                })
                .collect();
            let run = |crash_at: Option<usize>, rng: &mut rand::rngs::StdRng| {
                let t0 = Instant::now();
                let mut table = Table::new();
                let mut engine = Engine::new(cfg.clone());
                engine.assign(p(0), None);
                let mut committed: Option<Checkpoint> = None;
                let mut offset = 0usize;
                let mut crashed = false;
                while offset < events.len() {
                    engine.apply(&p(0), offset as i64, &events[offset], t0);
                    offset += 1;
                    if rng.random_range(0..10) == 0 {
                        flush(&mut engine, &mut table, t0);
                        committed = engine.checkpoints().first().map(|(_, c)| *c);
                    }
                    if Some(offset) == crash_at && !crashed {
                        crashed = true;
                        engine = Engine::new(cfg.clone());
                        engine.assign(p(0), committed.map(|c| c.horizon_ms));
                        offset = committed.map_or(0, |c| c.next_offset as usize);
                    }
                }
                flush(&mut engine, &mut table, t0 + Duration::from_secs(60));
                table
            };
            let reference = run(None, &mut rng);
            let crash_at = rng.random_range(1..events.len());
            assert_eq!(run(Some(crash_at), &mut rng), reference, "round {round}");
            if lateness == 5000 {
                let mut offline: HashMap<(String, Function, i64), Accumulator> = HashMap::new();
                let engine = Engine::new(cfg.clone());
                for e in &events {
                    for start in engine.window_starts(e.time_ms) {
                        offline
                            .entry((e.name.clone(), e.function, start))
                            .or_default()
                            .add(e.function, e.value);
                    }
                }
                let offline: Table = offline
                    .into_iter()
                    .map(|(k, a)| {
                        let f = k.1;
                        (k, (a.value(f), a.count()))
                    })
                    .collect();
                assert_eq!(reference, offline, "round {round}");
            }
        }
    }

    /// Rough engine throughput: `cargo test --release --lib engine_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn engine_throughput() {
        let t0 = Instant::now();
        let mut engine = Engine::new(EngineConfig {
            max_open_windows: 1_000_000,
            ..config()
        });
        engine.assign(p(0), None);
        let names: Vec<String> = (0..10_000).map(|i| format!("metric_{i:05}")).collect();
        let events: Vec<Event> = (0..2_000_000i64)
            .map(|i| {
                ev(
                    &names[(i * 7919 % 10_000) as usize],
                    Function::ALL[(i % 5) as usize],
                    (i % 1000) as f64 / 100.0,
                    i / 100,
                )
            })
            .collect();
        let started = Instant::now();
        let mut emitted = 0;
        for (offset, event) in events.iter().enumerate() {
            engine.apply(&p(0), offset as i64, event, t0);
            if offset % 20_000 == 0 {
                let e = engine.take_emissions(t0);
                emitted += e.len();
                engine.acknowledge(&e);
            }
        }
        let rate = events.len() as f64 / started.elapsed().as_secs_f64();
        println!(
            "{rate:.0} events/s, {emitted} emissions, {} open",
            engine.open_windows()
        );
    }
}
