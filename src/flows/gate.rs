//! A stage's side of flow control: each record held, released, skipped or delivered under the
//! active pauses, the rows written before a hold may be committed, and the rewinds on resume.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::DateTime;
use tokio::sync::watch;

use super::hold::{self, Decision, PartitionPause};
use super::store::{CountUpdate, FlowError, FlowStore, HoldRow, Registration};
use super::watch::FlowView;
use super::{PauseState, Scope};
use crate::filter::{FilterSet, SenderAndType};
use crate::stage::{Checkpoint, PartitionHooks, PartitionId, Record};

/// How often the held and released counts are added to the database.
const COUNT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The partitions assigned to this consumer, kept by the runtime's rebalance callbacks; what
/// the gate knew of a partition that changed hands is forgotten (another owner may have moved
/// it meanwhile), and read again from the database.
#[derive(Default)]
pub struct Assignment {
    changed: AtomicBool,
    state: Mutex<AssignmentState>,
}

#[derive(Default)]
struct AssignmentState {
    assigned: HashSet<PartitionId>,
    touched: Vec<PartitionId>,
}

impl Assignment {
    fn state(&self) -> std::sync::MutexGuard<'_, AssignmentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, partition: &PartitionId, assigned: bool) {
        let mut state = self.state();
        match assigned {
            true => state.assigned.insert(partition.clone()),
            false => state.assigned.remove(partition),
        };
        state.touched.push(partition.clone());
        self.changed.store(true, Ordering::Release);
    }
}

/// The runtime's partition hooks of a stage under flow control.
pub struct FlowHooks(pub Arc<Assignment>);

impl PartitionHooks for FlowHooks {
    fn assigned(&self, partition: &PartitionId, _committed_metadata: Option<&str>) {
        self.0.touch(partition, true);
    }

    fn revoked(&self, partition: &PartitionId) -> Option<Checkpoint> {
        self.0.touch(partition, false);
        None
    }
}

struct GatePause {
    id: String,
    filters: FilterSet,
    state: PauseState,
}

/// What this consumer knows of one pause on one partition.
#[derive(Debug, Default, Clone)]
struct LocalHold {
    /// Asked the database (at this pause's first held record since the assignment).
    registered: bool,
    /// The database said the pause holds nothing more here.
    live: bool,
    first_held: Option<i64>,
    resume_at: Option<i64>,
    drained: bool,
    /// Counted since the last flush, and the last offset counted (-1: none).
    held: i64,
    last_held: i64,
    released: i64,
    last_released: i64,
}

impl LocalHold {
    fn from_row(row: &HoldRow, registered: bool) -> LocalHold {
        LocalHold {
            registered,
            live: false,
            first_held: Some(row.first_held),
            resume_at: row.resume_at,
            drained: row.drained_at.is_some(),
            held: 0,
            last_held: row.last_held,
            released: 0,
            last_released: row.last_released.unwrap_or(-1),
        }
    }

    /// Takes what the database answered, keeping this consumer's uncounted records.
    fn update(&mut self, row: &HoldRow) {
        self.first_held = Some(row.first_held);
        self.resume_at = row.resume_at;
        self.drained = row.drained_at.is_some();
        self.last_held = self.last_held.max(row.last_held);
        self.last_released = self.last_released.max(row.last_released.unwrap_or(-1));
    }
}

/// Flow control for one consumer (`holder`: its consumer group) of one kind of stage.
pub struct FlowGate {
    store: FlowStore,
    holder: String,
    applies: fn(&Scope) -> bool,
    watch: watch::Receiver<Arc<FlowView>>,
    view: Arc<FlowView>,
    /// The active pauses in this stage's scope; empty: every record is delivered at once.
    pauses: Vec<GatePause>,
    partitions: HashMap<PartitionId, HashMap<String, LocalHold>>,
    assignment: Arc<Assignment>,
    last_flush: Instant,
}

impl FlowGate {
    /// A gate over `watch`'s pauses whose scope `applies`; `assignment` comes from the hooks
    /// given to the runtime (`FlowHooks`).
    pub fn new(
        store: FlowStore,
        holder: String,
        applies: fn(&Scope) -> bool,
        watch: watch::Receiver<Arc<FlowView>>,
        assignment: Arc<Assignment>,
    ) -> FlowGate {
        let view = watch.borrow().clone();
        let mut gate = FlowGate {
            store,
            holder,
            applies,
            view,
            watch,
            pauses: Vec::new(),
            partitions: HashMap::new(),
            assignment,
            last_flush: Instant::now(),
        };
        gate.take_view();
        gate
    }

    /// Whether any pause applies now (the per-record cost without one: this check).
    pub fn is_idle(&self) -> bool {
        self.pauses.is_empty()
    }

    fn take_view(&mut self) {
        self.view = self.watch.borrow_and_update().clone();
        self.pauses = self
            .view
            .pauses
            .iter()
            .filter(|p| (self.applies)(&p.scope) && p.state != PauseState::Resumed)
            .map(|p| GatePause {
                id: p.id.clone(),
                filters: p.filters.clone(),
                state: p.state,
            })
            .collect();
        metrics::gauge!(super::metrics::OBEYED).set(self.pauses.len() as f64);
        let active: HashSet<&str> = self.pauses.iter().map(|p| p.id.as_str()).collect();
        for holds in self.partitions.values_mut() {
            holds.retain(|id, _| active.contains(id.as_str()));
        }
    }

    /// Forgets partitions that changed hands since the last look.
    fn sync_assignment(&mut self) {
        if !self.assignment.changed.swap(false, Ordering::AcqRel) {
            return;
        }
        let touched = std::mem::take(&mut self.assignment.state().touched);
        for partition in touched {
            self.partitions.remove(&partition);
        }
    }

    /// What this consumer's rows on a partition say, read fresh: the first record of a
    /// partition since its assignment (while pauses apply) waits for it.
    async fn load(&mut self, partition: &PartitionId) -> Result<(), FlowError> {
        let rows = self
            .store
            .holds_of(&self.holder, &partition.topic, partition.partition)
            .await?;
        let holds = rows
            .iter()
            .map(|row| (row.pause_id.clone(), LocalHold::from_row(row, false)))
            .collect();
        self.partitions.insert(partition.clone(), holds);
        Ok(())
    }

    /// What becomes of `record`. A first held record of a partition (per pause and assignment)
    /// is written to the database before this returns, so its offset may then be committed.
    pub async fn decide(&mut self, record: &Record<'_>) -> Result<Decision, FlowError> {
        if self.pauses.is_empty() {
            return Ok(Decision::Deliver);
        }
        self.sync_assignment();
        let partition = record.partition_id();
        if !self.partitions.contains_key(&partition) {
            self.load(&partition).await?;
        }
        let names = SenderAndType::of(
            record.header("service"),
            record.header("action"),
            Some(record.payload),
        );
        loop {
            let decision = self.rule(&partition, record.offset, &names);
            if let Decision::Hold(index) = decision {
                let id = self.pauses[index].id.clone();
                let known = self.partitions[&partition]
                    .get(&id)
                    .is_some_and(|h| h.registered);
                if !known {
                    self.register(&id, &partition, record).await?;
                    continue;
                }
            }
            self.account(&partition, decision, record.offset).await?;
            return Ok(decision);
        }
    }

    fn rule(&self, partition: &PartitionId, offset: i64, names: &SenderAndType<'_>) -> Decision {
        let holds = &self.partitions[partition];
        let none = LocalHold::default();
        let rules: Vec<PartitionPause<'_>> = self
            .pauses
            .iter()
            .map(|pause| {
                let local = holds.get(&pause.id).unwrap_or(&none);
                let holding = !local.live
                    && match pause.state {
                        PauseState::Paused => true,
                        PauseState::Resuming => local.resume_at.is_none(),
                        PauseState::Resumed => false,
                    };
                PartitionPause {
                    filters: &pause.filters,
                    holding,
                    first_held: local.first_held,
                    resume_at: local.resume_at,
                }
            })
            .collect();
        hold::decide(&rules, offset, &names.service, &names.action)
    }

    async fn register(
        &mut self,
        pause_id: &str,
        partition: &PartitionId,
        record: &Record<'_>,
    ) -> Result<(), FlowError> {
        let time = record
            .timestamp_ms
            .and_then(DateTime::from_timestamp_millis);
        let answer = self
            .store
            .register_hold(
                pause_id,
                &self.holder,
                &partition.topic,
                partition.partition,
                record.offset,
                time,
            )
            .await?;
        let holds = self.partitions.entry(partition.clone()).or_default();
        let local = holds.entry(pause_id.to_string()).or_insert(LocalHold {
            last_held: -1,
            last_released: -1,
            ..LocalHold::default()
        });
        local.registered = true;
        match answer {
            Registration::Hold(row) => {
                tracing::info!(pause = pause_id, topic = %partition.topic, partition = partition.partition, first_held = row.first_held, "holding the pause's events of the partition (they stay in Kafka)");
                local.update(&row)
            }
            Registration::Release(row) => {
                local.live = true;
                if let Some(row) = row {
                    local.update(&row);
                }
            }
        }
        Ok(())
    }

    /// Counts a held or released record (once per offset) and drains what reached its end.
    async fn account(
        &mut self,
        partition: &PartitionId,
        decision: Decision,
        offset: i64,
    ) -> Result<(), FlowError> {
        let Some(holds) = self.partitions.get_mut(partition) else {
            return Ok(());
        };
        match decision {
            Decision::Hold(index) | Decision::Release(index) => {
                if let Some(local) = holds.get_mut(&self.pauses[index].id) {
                    if matches!(decision, Decision::Hold(_)) && offset > local.last_held {
                        local.held += 1;
                        local.last_held = offset;
                    }
                    if matches!(decision, Decision::Release(_)) && offset > local.last_released {
                        local.released += 1;
                        local.last_released = offset;
                    }
                }
            }
            Decision::Deliver | Decision::Skip => {}
        }
        let done: Vec<String> = holds
            .iter()
            .filter(|(_, h)| !h.drained && h.resume_at.is_some_and(|end| offset + 1 >= end))
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            // The released counts go first, so a resumed pause shows nothing held.
            self.flush_counts().await?;
            self.store
                .mark_drained(&id, &self.holder, &partition.topic, partition.partition)
                .await?;
            if let Some(local) = self
                .partitions
                .get_mut(partition)
                .and_then(|h| h.get_mut(&id))
            {
                local.drained = true;
            }
            tracing::info!(pause = id, topic = %partition.topic, partition = partition.partition, "held events of the partition released");
        }
        Ok(())
    }

    async fn flush_counts(&mut self) -> Result<(), FlowError> {
        let mut updates = Vec::new();
        for (partition, holds) in &self.partitions {
            for (id, local) in holds {
                if local.held > 0 || local.released > 0 {
                    updates.push(CountUpdate {
                        pause_id: id.clone(),
                        holder: self.holder.clone(),
                        topic: partition.topic.to_string(),
                        partition: partition.partition,
                        held: local.held,
                        last_held: local.last_held,
                        released: local.released,
                        last_released: local.last_released,
                    });
                }
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        self.store.add_counts(&updates).await?;
        for holds in self.partitions.values_mut() {
            for local in holds.values_mut() {
                local.held = 0;
                local.released = 0;
            }
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Periodic: takes a new view of the pauses, reads the rows of assigned partitions a
    /// resuming pause must release (so `rewinds` names them), adds the counts every second.
    /// A database failure is logged and tried again on the next tick.
    pub async fn tick(&mut self) {
        self.sync_assignment();
        if self.watch.has_changed().unwrap_or(false) {
            self.take_view();
        }
        if self.pauses.is_empty() && self.partitions.is_empty() {
            return;
        }
        let unknown: Vec<PartitionId> = {
            let state = self.assignment.state();
            let resuming: HashSet<&str> = self
                .pauses
                .iter()
                .filter(|p| p.state == PauseState::Resuming)
                .map(|p| p.id.as_str())
                .collect();
            self.view
                .pauses
                .iter()
                .filter(|p| resuming.contains(p.id.as_str()))
                .flat_map(|p| &p.holds)
                .filter(|h| h.holder == self.holder && h.resume_at.is_none())
                .map(|h| PartitionId {
                    topic: h.topic.as_str().into(),
                    partition: h.partition,
                })
                .filter(|id| state.assigned.contains(id) && !self.partitions.contains_key(id))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        for partition in unknown {
            if let Err(error) = self.load(&partition).await {
                tracing::warn!(%error, "reading a partition's holds failed; trying again");
                return;
            }
        }
        if self.last_flush.elapsed() >= COUNT_FLUSH_INTERVAL {
            if let Err(error) = self.flush_counts().await {
                tracing::warn!(%error, "counting held events failed; trying again");
            }
        }
    }

    /// The pauses of `holds` that are resuming and still wait for this partition to move back.
    fn waiting_release(&self, holds: &HashMap<String, LocalHold>) -> Vec<String> {
        self.pauses
            .iter()
            .filter(|p| p.state == PauseState::Resuming)
            .filter(|p| {
                holds
                    .get(&p.id)
                    .is_some_and(|h| !h.live && h.first_held.is_some() && h.resume_at.is_none())
            })
            .map(|p| p.id.clone())
            .collect()
    }

    /// Assigned partitions to move back, for a resuming pause that held records there.
    pub fn rewinds(&self) -> Vec<PartitionId> {
        if self.pauses.is_empty() {
            return Vec::new();
        }
        let state = self.assignment.state();
        self.partitions
            .iter()
            .filter(|(id, holds)| {
                state.assigned.contains(*id) && !self.waiting_release(holds).is_empty()
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The runtime made everything it handled of `partition` durable up to `position`: record
    /// where the release ends, and return where to read again from (`None`: nothing to).
    pub async fn rewind_from(
        &mut self,
        partition: &PartitionId,
        position: i64,
    ) -> Result<Option<i64>, FlowError> {
        let Some(holds) = self.partitions.get(partition) else {
            return Ok(None);
        };
        let pauses = self.waiting_release(holds);
        if pauses.is_empty() {
            return Ok(None);
        }
        let rows = self
            .store
            .begin_release(
                &pauses,
                &self.holder,
                &partition.topic,
                partition.partition,
                position,
            )
            .await?;
        if rows.is_empty() {
            // Someone else moved it meanwhile, or the pause changed: read again.
            self.load(partition).await?;
            return Ok(None);
        }
        let holds = self.partitions.entry(partition.clone()).or_default();
        for row in &rows {
            holds
                .entry(row.pause_id.clone())
                .or_insert_with(|| LocalHold::from_row(row, true))
                .update(row);
            tracing::info!(pause = row.pause_id, topic = %partition.topic, partition = partition.partition, first_held = row.first_held, resume_at = ?row.resume_at, "releasing held events: reading the partition again");
        }
        Ok(rows
            .iter()
            .filter(|r| r.drained_at.is_none())
            .map(|r| r.first_held.min(position))
            .min())
    }
}
