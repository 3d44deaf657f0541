//! The live fan-out: one reader per gateway instance follows every partition of the served topics
//! (no consumer group) and hands each event to the connections whose filters select it.
//!
//! Subscribers are indexed by their filters' exact sender and type, so an event wakes only the
//! connections it is for. Each connection has a bounded queue; one that is full marks its
//! connection slow and drops it from the hub (it resumes from its cursor), so a slow client never
//! makes the hub, or anyone else, wait or grow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::filter::{FilterSet, Part};
use crate::gateway::cursor::Cursor;
use crate::gateway::event::Event;

/// Connections and the reader's position, behind one lock the reader takes once per event.
pub struct Hub {
    state: Mutex<HubState>,
    queue_capacity: usize,
}

#[derive(Default)]
struct HubState {
    /// The next offset the reader delivers, per topic and partition.
    positions: Cursor,
    subscribers: HashMap<u64, Subscriber>,
    /// Subscribers by what their filters name: `s:a`, `s:*`, `*:a`, `*:*`.
    exact: HashMap<Box<str>, HashMap<Box<str>, Vec<u64>>>,
    by_service: HashMap<Box<str>, Vec<u64>>,
    by_action: HashMap<Box<str>, Vec<u64>>,
    everything: Vec<u64>,
    next_id: u64,
    /// Which event a subscriber last received, so one listed under several keys gets it once.
    stamp: u64,
}

struct Subscriber {
    filters: FilterSet,
    /// Empty: every topic.
    topics: Vec<Arc<str>>,
    queue: mpsc::Sender<Arc<Event>>,
    slow: Arc<AtomicBool>,
    stamp: u64,
}

/// One connection's live queue, as [`Hub::queues`] reports it.
#[derive(Debug, Clone)]
pub struct QueueFill {
    pub filters: FilterSet,
    /// Empty: every topic.
    pub topics: Vec<String>,
    pub queued: usize,
    pub capacity: usize,
}

/// What one published event reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub delivered: usize,
    pub dropped_slow: usize,
}

/// A connection's registration: live events arrive on `receiver` from `start` on.
pub struct LiveFeed {
    id: u64,
    hub: Arc<Hub>,
    pub receiver: mpsc::Receiver<Arc<Event>>,
    slow: Arc<AtomicBool>,
    /// The hub's next offsets of the subscribed topics when this feed was registered: every
    /// event at or after them arrives on `receiver`, every one before them did not.
    pub start: Cursor,
}

impl LiveFeed {
    /// Whether the hub dropped this feed because its queue was full.
    pub fn was_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }
}

impl Drop for LiveFeed {
    fn drop(&mut self) {
        self.hub.unregister(self.id);
    }
}

impl Hub {
    pub fn new(queue_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(HubState::default()),
            queue_capacity: queue_capacity.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // A poisoned lock only means a panic elsewhere; the maps stay consistent between events.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the reader starts a partition (before any event of it is published).
    pub fn set_position(&self, topic: &str, partition: i32, next_offset: i64) {
        self.lock().positions.set(topic, partition, next_offset);
    }

    /// The reader's next offsets for `topics` (all when empty).
    pub fn positions(&self, topics: &[String]) -> Cursor {
        let state = self.lock();
        if topics.is_empty() {
            state.positions.clone()
        } else {
            state.positions.restricted_to(topics)
        }
    }

    pub fn connections(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Every connection's selection and how many live events wait in its queue (of
    /// `capacity`), for the console.
    pub fn queues(&self) -> Vec<QueueFill> {
        let state = self.lock();
        state
            .subscribers
            .values()
            .map(|s| QueueFill {
                filters: s.filters.clone(),
                topics: s.topics.iter().map(|t| t.to_string()).collect(),
                queued: s.queue.max_capacity() - s.queue.capacity(),
                capacity: s.queue.max_capacity(),
            })
            .collect()
    }

    /// Registers a connection for the events `filters` select from `topics` (empty: all).
    pub fn register(self: &Arc<Self>, filters: FilterSet, topics: &[String]) -> LiveFeed {
        let (queue, receiver) = mpsc::channel(self.queue_capacity);
        let slow = Arc::new(AtomicBool::new(false));
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        for filter in filters.filters() {
            let list = match (&filter.service, &filter.action) {
                (Part::Name(s), Part::Name(a)) => state
                    .exact
                    .entry(s.as_str().into())
                    .or_default()
                    .entry(a.as_str().into())
                    .or_default(),
                (Part::Name(s), Part::Any) => {
                    state.by_service.entry(s.as_str().into()).or_default()
                }
                (Part::Any, Part::Name(a)) => state.by_action.entry(a.as_str().into()).or_default(),
                (Part::Any, Part::Any) => &mut state.everything,
            };
            list.push(id);
        }
        let start = if topics.is_empty() {
            state.positions.clone()
        } else {
            state.positions.restricted_to(topics)
        };
        state.subscribers.insert(
            id,
            Subscriber {
                filters,
                topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
                queue,
                slow: slow.clone(),
                stamp: 0,
            },
        );
        drop(state);
        LiveFeed {
            id,
            hub: self.clone(),
            receiver,
            slow,
            start,
        }
    }

    fn unregister(&self, id: u64) {
        let mut state = self.lock();
        state.remove(id);
    }

    /// Moves the reader's position past an event no connection selects, and says so; `false`
    /// (nothing moved) when some connection wants it. The check and the move are under the lock
    /// registration takes, so a connection that joins afterwards starts after the event and is
    /// owed nothing — the reader can skip building an event nobody reads.
    pub fn skip_unwanted(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        service: &str,
        action: &str,
    ) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        let wanted = state
            .selecting(service, action)
            .filter_map(|id| state.subscribers.get(id))
            .any(|subscriber| subscriber.reads(topic));
        if !wanted {
            state.positions.advance(topic, partition, offset);
        }
        !wanted
    }

    /// Hands `event` to every connection that selects it; a full queue marks its connection
    /// slow and drops it. Advances the reader's position past the event.
    pub fn publish(&self, event: &Arc<Event>) -> Published {
        let mut state = self.lock();
        let state = &mut *state;
        state
            .positions
            .advance(&event.topic, event.partition, event.offset);
        state.stamp += 1;
        let stamp = state.stamp;
        let mut published = Published::default();
        let mut dropped: Vec<u64> = Vec::new();
        let HubState {
            exact,
            by_service,
            by_action,
            everything,
            subscribers,
            ..
        } = state;
        for id in selecting(
            exact,
            by_service,
            by_action,
            everything,
            &event.service,
            &event.action,
        ) {
            let Some(subscriber) = subscribers.get_mut(id) else {
                continue;
            };
            if subscriber.stamp == stamp || !subscriber.reads(&event.topic) {
                continue;
            }
            subscriber.stamp = stamp;
            match subscriber.queue.try_send(event.clone()) {
                Ok(()) => published.delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.slow.store(true, Ordering::Release);
                    published.dropped_slow += 1;
                    dropped.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => dropped.push(*id),
            }
        }
        for id in dropped {
            state.remove(id);
        }
        published
    }
}

/// The ids listed under an event's sender and type (a subscriber may appear more than once).
fn selecting<'s>(
    exact: &'s HashMap<Box<str>, HashMap<Box<str>, Vec<u64>>>,
    by_service: &'s HashMap<Box<str>, Vec<u64>>,
    by_action: &'s HashMap<Box<str>, Vec<u64>>,
    everything: &'s [u64],
    service: &str,
    action: &str,
) -> impl Iterator<Item = &'s u64> {
    [
        exact.get(service).and_then(|actions| actions.get(action)),
        by_service.get(service),
        by_action.get(action),
    ]
    .into_iter()
    .flatten()
    .flatten()
    .chain(everything)
}

impl Subscriber {
    fn reads(&self, topic: &str) -> bool {
        self.topics.is_empty() || self.topics.iter().any(|t| &**t == topic)
    }
}

impl HubState {
    fn selecting<'s>(&'s self, service: &str, action: &str) -> impl Iterator<Item = &'s u64> {
        selecting(
            &self.exact,
            &self.by_service,
            &self.by_action,
            &self.everything,
            service,
            action,
        )
    }

    fn remove(&mut self, id: u64) {
        let Some(subscriber) = self.subscribers.remove(&id) else {
            return;
        };
        for filter in subscriber.filters.filters() {
            let list = match (&filter.service, &filter.action) {
                (Part::Name(s), Part::Name(a)) => self
                    .exact
                    .get_mut(s.as_str())
                    .and_then(|actions| actions.get_mut(a.as_str())),
                (Part::Name(s), Part::Any) => self.by_service.get_mut(s.as_str()),
                (Part::Any, Part::Name(a)) => self.by_action.get_mut(a.as_str()),
                (Part::Any, Part::Any) => Some(&mut self.everything),
            };
            if let Some(list) = list {
                list.retain(|other| *other != id);
            }
        }
        // Empty lists go, so the maps do not keep every name ever subscribed to.
        self.exact.retain(|_, actions| {
            actions.retain(|_, list| !list.is_empty());
            !actions.is_empty()
        });
        self.by_service.retain(|_, list| !list.is_empty());
        self.by_action.retain(|_, list| !list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &str, partition: i32, offset: i64, service: &str, action: &str) -> Arc<Event> {
        Arc::new(Event {
            topic: topic.into(),
            partition,
            offset,
            service: service.into(),
            action: action.into(),
            timestamp_ms: None,
            replay: false,
            json: format!("{{\"offset\":{offset}}}").into(),
        })
    }

    fn drain(feed: &mut LiveFeed) -> Vec<i64> {
        let mut offsets = Vec::new();
        while let Ok(event) = feed.receiver.try_recv() {
            offsets.push(event.offset);
        }
        offsets
    }

    #[test]
    fn each_connection_gets_exactly_what_its_filters_and_topics_select_once() {
        let hub = Hub::new(100);
        let filters = |f: &[&str]| FilterSet::parse(f).unwrap();
        let mut lk = hub.register(filters(&["lk:*"]), &[]);
        let mut creates = hub.register(filters(&["*:create_user", "lk:create_user"]), &[]);
        let mut pair = hub.register(filters(&["lk:create_user", "arm:update_user"]), &[]);
        let mut all_tasks = hub.register(FilterSet::everything(), &["task_in".into()]);
        let events = [
            event("create_user_in", 0, 0, "lk", "create_user"),
            event("update_user_in", 0, 0, "arm", "update_user"),
            event("task_in", 0, 0, "lk", "run_task"),
            event("create_user_in", 1, 0, "arm", "create_user"),
            event("task_in", 0, 1, "arm", "update_user"),
        ];
        let mut reached = Vec::new();
        for e in &events {
            reached.push(hub.publish(e).delivered);
        }
        assert_eq!(reached, [3, 1, 2, 1, 2]);
        assert_eq!(drain(&mut lk).len(), 2);
        assert_eq!(drain(&mut creates).len(), 2, "listed twice, delivered once");
        assert_eq!(drain(&mut pair).len(), 3);
        assert_eq!(drain(&mut all_tasks), [0, 1]);
        assert_eq!(
            hub.positions(&["task_in".into()]).get("task_in", 0),
            Some(2)
        );
    }

    #[test]
    fn a_full_queue_drops_only_its_connection_and_says_it_was_slow() {
        let hub = Hub::new(2);
        let slow = hub.register(FilterSet::everything(), &[]);
        let mut fast = hub.register(FilterSet::everything(), &[]);
        for offset in 0..3 {
            hub.publish(&event("t", 0, offset, "s", "a"));
            drain(&mut fast);
        }
        assert!(slow.was_slow());
        assert!(!fast.was_slow());
        assert_eq!(hub.connections(), 1);
        drop(fast);
        assert_eq!(hub.connections(), 0);
        let state = hub.lock();
        assert!(state.everything.is_empty() && state.exact.is_empty());
    }

    #[test]
    fn an_event_nobody_selects_is_skipped_and_a_later_feed_starts_after_it() {
        let hub = Hub::new(10);
        hub.set_position("t", 0, 5);
        let mut lk = hub.register(FilterSet::parse(&["lk:*"]).unwrap(), &[]);
        let mut other_topic = hub.register(FilterSet::everything(), &["u".into()]);
        assert!(
            hub.skip_unwanted("t", 0, 5, "arm", "x"),
            "nobody reads arm on t"
        );
        assert_eq!(hub.positions(&[]).get("t", 0), Some(6));
        assert!(!hub.skip_unwanted("t", 0, 6, "lk", "x"), "lk:* wants it");
        assert_eq!(
            hub.positions(&[]).get("t", 0),
            Some(6),
            "not moved: it is published"
        );
        hub.publish(&event("t", 0, 6, "lk", "x"));
        assert_eq!(drain(&mut lk), [6]);
        assert!(drain(&mut other_topic).is_empty());
        let late = hub.register(FilterSet::everything(), &[]);
        assert_eq!(late.start.get("t", 0), Some(7));
    }

    #[test]
    fn a_feed_starts_where_the_reader_is_when_it_registers() {
        let hub = Hub::new(10);
        hub.set_position("t", 0, 5);
        hub.publish(&event("t", 0, 5, "s", "a"));
        let mut feed = hub.register(FilterSet::everything(), &[]);
        assert_eq!(feed.start.get("t", 0), Some(6));
        hub.publish(&event("t", 0, 6, "s", "a"));
        assert_eq!(drain(&mut feed), [6]);
    }
}
