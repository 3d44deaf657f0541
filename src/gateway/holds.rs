//! Flow control in the gateway's streams: which pauses hold a stream's events, the hold rule per
//! event, and what a stream owes after a resume; one pause watcher per instance feeds every stream.
//!
//! A held event is not delivered, yet the stream's position moves past it (other events keep
//! flowing): the cursor remembers, per partition, each pause holding there and the first offset
//! it held (`Cursor::hold`). Every event of that partition at or after `first_held` that the pause
//! matches (and the stream selects) is owed: while the pause holds, it holds them; once it is
//! over, the stream re-reads `[first_held, position)` from Kafka and delivers exactly those — the
//! rule of `flows::hold`, with `resume_at` being the stream's position when it releases. Since
//! every frame's id carries the holds, a client that reconnects (or a durable subscription's
//! stored position) keeps what is owed; nothing is lost and nothing comes twice.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::filter::FilterSet;
use crate::flows::store::{FlowError, Injection};
use crate::flows::watch::FlowView;
use crate::flows::{FlowStore, PauseState, Scope};
use crate::gateway::cursor::Cursor;
use crate::gateway::event::Event;
use crate::store::history::StoredEvent;

/// The instance's pause watcher, shared by every stream.
#[derive(Clone)]
pub struct FlowContext {
    pub watch: watch::Receiver<Arc<Vec<GatewayPause>>>,
    pub store: FlowStore,
}

/// A pause as streams see it: the watcher publishes the pauses (with their holders' counts)
/// every 250 ms; this is re-published only when one of these fields changes, so an idle stream
/// is woken by a pause, a resume or an injection, not by every poll.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayPause {
    pub id: String,
    pub filters: FilterSet,
    pub scope: Scope,
    pub state: PauseState,
    pub inject: Option<Injection>,
}

impl FlowContext {
    /// Follows the instance's `FlowView` until it ends (with the watcher, at shutdown).
    pub fn start(mut view: watch::Receiver<Arc<FlowView>>, store: FlowStore) -> FlowContext {
        let of = |view: &FlowView| -> Vec<GatewayPause> {
            view.pauses
                .iter()
                .map(|p| GatewayPause {
                    id: p.id.clone(),
                    filters: p.filters.clone(),
                    scope: p.scope.clone(),
                    state: p.state,
                    inject: p.inject.clone(),
                })
                .collect()
        };
        let (sender, watch) = watch::channel(Arc::new(of(&view.borrow_and_update())));
        tokio::spawn(async move {
            while view.changed().await.is_ok() {
                let pauses = of(&view.borrow_and_update());
                sender.send_if_modified(|current| {
                    let modified = **current != pauses;
                    if modified {
                        *current = Arc::new(pauses);
                    }
                    modified
                });
            }
        });
        FlowContext { watch, store }
    }
}

/// One pause as a stream sees it.
#[derive(Debug, Clone)]
pub struct StreamPause {
    pub id: String,
    pub filters: FilterSet,
    /// Paused and in this stream's scope: it holds what it matches, read for the first time.
    /// Otherwise it is over, and the stream's cursor still names it (events owed, an injection
    /// under way).
    pub holding: bool,
    pub inject: Option<Injection>,
}

/// A stream's flow control: the pauses that touch it.
pub struct StreamFlows {
    context: Option<FlowContext>,
    /// The durable subscription the stream is attached to, for `subscription:NAME` pauses.
    subscription: Option<String>,
    pauses: Vec<StreamPause>,
    /// Pauses the view no longer lists (resumed): filters and injection, looked up once.
    over: HashMap<String, (FilterSet, Option<Injection>)>,
}

impl StreamFlows {
    pub fn new(context: Option<FlowContext>, subscription: Option<String>) -> StreamFlows {
        StreamFlows {
            context,
            subscription,
            pauses: Vec::new(),
            over: HashMap::new(),
        }
    }

    /// No pause touches the stream: every event goes out as it comes (the per-event cost of
    /// flow control then: this check).
    pub fn is_idle(&self) -> bool {
        self.pauses.is_empty()
    }

    pub fn pauses(&self) -> &[StreamPause] {
        &self.pauses
    }

    /// Whether the pauses changed since the last `refresh` (an atomic load).
    pub fn changed(&self) -> bool {
        self.context
            .as_ref()
            .is_some_and(|c| c.watch.has_changed().unwrap_or(false))
    }

    /// Resolves when the pauses change; never without a watcher.
    pub async fn wait_changed(&mut self) {
        match &mut self.context {
            Some(context) => {
                if context.watch.changed().await.is_err() {
                    std::future::pending::<()>().await
                }
            }
            None => std::future::pending::<()>().await,
        }
    }

    fn applies(&self, scope: &Scope) -> bool {
        match scope {
            Scope::Gateway | Scope::All => true,
            Scope::Subscription(name) => self.subscription.as_deref() == Some(name.as_str()),
            Scope::Dispatch => false,
        }
    }

    /// Takes the current view: the paused pauses in scope hold; pauses the cursor names that
    /// are over are kept (with their filters, read from the database once when the view no
    /// longer lists them) until the stream has delivered what they owe.
    pub async fn refresh(&mut self, cursor: &Cursor) -> Result<(), FlowError> {
        let Some(context) = &mut self.context else {
            return Ok(());
        };
        let view = context.watch.borrow_and_update().clone();
        let store = context.store.clone();
        let mut pauses: Vec<StreamPause> = view
            .iter()
            .filter(|p| p.state == PauseState::Paused && self.applies(&p.scope))
            .map(|p| StreamPause {
                id: p.id.clone(),
                filters: p.filters.clone(),
                holding: true,
                inject: p.inject.clone(),
            })
            .collect();
        if cursor.has_flow_state() {
            for id in cursor.flow_pauses() {
                if pauses.iter().any(|p| p.id == id) {
                    continue;
                }
                let listed = view.iter().find(|p| p.id == id);
                let (filters, inject) = match listed {
                    Some(pause) => (pause.filters.clone(), pause.inject.clone()),
                    None => match self.over.get(id) {
                        Some(known) => known.clone(),
                        None => {
                            let pause = store.get(id).await?;
                            let known = (pause.filters, pause.inject);
                            self.over.insert(id.to_string(), known.clone());
                            known
                        }
                    },
                };
                pauses.push(StreamPause {
                    id: id.to_string(),
                    filters,
                    holding: false,
                    inject,
                });
            }
        }
        self.pauses = pauses;
        Ok(())
    }

    /// Whether the stream has something to do before it reads on: an injection to deliver, or
    /// events a pause that is over still owes.
    pub fn due(&self, cursor: &Cursor) -> bool {
        self.pauses.iter().any(|p| {
            let injected = cursor.injected(&p.id);
            match p.holding {
                true => {
                    p.inject.is_some() && injected != Some(crate::gateway::cursor::Injected::Done)
                }
                false => true,
            }
        })
    }

    /// An event read for the first time, which the stream selects: held (recorded in the
    /// cursor) when a pause holding here matches it — one that holds, or one that is over but
    /// still owes earlier events of this partition (delivering this one now would overtake them).
    pub fn hold(&self, cursor: &mut Cursor, at: EventAt<'_>) -> bool {
        let holder = self.pauses.iter().find(|p| {
            p.filters.matches(at.service, at.action)
                && (p.holding || cursor.held_from(at.topic, at.partition, &p.id).is_some())
        });
        match holder {
            Some(pause) => {
                cursor.hold(at.topic, at.partition, &pause.id, at.offset);
                metrics::counter!(HELD, "pause" => pause.id.clone()).increment(1);
                true
            }
            None => false,
        }
    }

    /// Whether an event below the cursor is owed by a hold (it will come with its release).
    pub fn owed(&self, cursor: &Cursor, at: EventAt<'_>) -> Option<&StreamPause> {
        self.pauses.iter().find(|p| {
            cursor
                .held_from(at.topic, at.partition, &p.id)
                .is_some_and(|first| first <= at.offset)
                && p.filters.matches(at.service, at.action)
        })
    }
}

/// Where an event is and what it is: all the hold rule looks at.
#[derive(Debug, Clone, Copy)]
pub struct EventAt<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub service: &'a str,
    pub action: &'a str,
}

impl<'a> EventAt<'a> {
    pub fn of(e: &'a Event) -> EventAt<'a> {
        EventAt::new(&e.topic, e.partition, e.offset, &e.service, &e.action)
    }

    pub fn stored(e: &'a StoredEvent) -> EventAt<'a> {
        EventAt::new(&e.topic, e.partition, e.offset, &e.service, &e.action)
    }

    fn new(topic: &'a str, partition: i32, offset: i64, service: &'a str, action: &'a str) -> Self {
        EventAt {
            topic,
            partition,
            offset,
            service,
            action,
        }
    }
}

/// Events a gateway stream held, per pause (the database's `held` counts the dispatcher's).
pub const HELD: &str = "eventpipe_gateway_flow_held_events_total";
/// Held events a gateway stream delivered after the pause was over.
pub const RELEASED: &str = "eventpipe_gateway_flow_released_events_total";
/// History events injected into gateway streams, per pause.
pub const INJECTED: &str = "eventpipe_gateway_flow_injected_events_total";

pub fn describe() {
    metrics::describe_counter!(HELD, "Events gateway streams held for a pause");
    metrics::describe_counter!(
        RELEASED,
        "Held events gateway streams delivered once their pause was over"
    );
    metrics::describe_counter!(
        INJECTED,
        "History events gateway streams delivered, marked replay, for a pause's injection"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(id: &str, filter: &str, holding: bool) -> StreamPause {
        StreamPause {
            id: id.into(),
            filters: FilterSet::parse(&[filter]).unwrap(),
            holding,
            inject: None,
        }
    }

    fn at(partition: i32, offset: i64, service: &'static str) -> EventAt<'static> {
        EventAt::new("t", partition, offset, service, "x")
    }

    #[test]
    fn a_holding_pause_holds_what_it_matches_and_the_cursor_keeps_it_owed() {
        let mut flows = StreamFlows::new(None, None);
        assert!(flows.is_idle());
        flows.pauses = vec![pause("p1", "lk:*", true)];
        let mut cursor = Cursor::default();
        cursor.advance("t", 0, 4);
        assert!(flows.hold(&mut cursor, at(0, 5, "lk")));
        assert!(!flows.hold(&mut cursor, at(0, 6, "arm")));
        assert!(flows.hold(&mut cursor, at(0, 7, "lk")));
        assert_eq!(
            cursor.held_from("t", 0, "p1"),
            Some(5),
            "the first one stays"
        );
        assert!(flows.owed(&cursor, at(0, 7, "lk")).is_some());
        assert!(
            flows.owed(&cursor, at(0, 4, "lk")).is_none(),
            "before it held"
        );
        assert!(flows.owed(&cursor, at(0, 6, "arm")).is_none());
        assert!(!flows.due(&cursor));
    }

    #[test]
    fn a_pause_that_is_over_holds_only_where_it_still_owes_and_is_due() {
        let mut flows = StreamFlows::new(None, None);
        flows.pauses = vec![pause("p1", "lk:*", false)];
        let mut cursor = Cursor::default();
        cursor.hold("t", 0, "p1", 3);
        // Partition 0 owes lk from 3: a later lk there must wait for the release.
        assert!(flows.hold(&mut cursor, at(0, 9, "lk")));
        // Partition 1 owes nothing: live.
        assert!(!flows.hold(&mut cursor, at(1, 9, "lk")));
        assert!(flows.due(&cursor));
    }
}
