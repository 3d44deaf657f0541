//! The product catalogue: products seeded in PostgreSQL (name, price, stock, a generated photo)
//! and the generator of their price and stock changes to `product_changes` (`generate products`).
//!
//! The products live in a materialised table (`crate::materialise`, one row per product id with
//! its version and state): the generator seeds version 0, `eventpipe materialise` moves rows
//! forward from the changes. Photos live in `product_photos` (migrations/catalogue).

pub mod photo;

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::generate::{GeneratedRecord, Pacer, RecordSource};
use crate::materialise::table::{self, TableName};

/// The topic of changes, as topics/topics.toml declares it.
pub const CHANGES_TOPIC: &str = "product_changes";

/// The catalogue's migrations (photos); like every command's, they ignore the others' versions.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/catalogue");
    migrator.set_ignore_missing(true);
    migrator
}

/// A product as seeded (version 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub id: u64,
    pub name: String,
    pub price_cents: i64,
    pub stock: i64,
}

const ADJECTIVES: [&str; 12] = [
    "Red", "Blue", "Green", "Golden", "Silver", "Tiny", "Grand", "Quiet", "Swift", "Rustic",
    "Cosy", "Bright",
];
const NOUNS: [&str; 12] = [
    "Kettle", "Lamp", "Chair", "Teapot", "Backpack", "Notebook", "Umbrella", "Mug", "Clock",
    "Blanket", "Scarf", "Vase",
];

/// The catalogue of `count` products for `seed`: the same seed, the same catalogue.
pub fn seeded(seed: u64, count: u64) -> Vec<Product> {
    let mut rng = StdRng::seed_from_u64(seed);
    (1..=count)
        .map(|id| Product {
            id,
            name: format!(
                "{} {} {id}",
                ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                NOUNS[rng.random_range(0..NOUNS.len())]
            ),
            price_cents: rng.random_range(100..=99_999),
            stock: rng.random_range(0..=500),
        })
        .collect()
}

/// Connects with the catalogue's tables in place: `table` (the products) and `product_photos`.
pub async fn connect(url: &str, table: &TableName) -> anyhow::Result<PgPool> {
    let pool = crate::postgres::connect_migrated(url, 2, &migrator(), "product catalogue").await?;
    table::ensure(&pool, table).await?;
    Ok(pool)
}

/// Creates the products (version 0) and photos that are missing; returns how many products
/// were created (0 on every run after the first).
pub async fn create(
    pool: &PgPool,
    table: &TableName,
    products: &[Product],
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut created = 0;
    for product in products {
        let state = json!({"id": product.id, "name": product.name,
                           "price_cents": product.price_cents, "stock": product.stock});
        created += sqlx::query(&format!(
            "INSERT INTO {table} (key, version, state) VALUES ($1, 0, $2::jsonb) ON CONFLICT (key) DO NOTHING"
        ))
        .bind(product.id.to_string())
        .bind(state.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let bytes = photo::svg(product.id, &product.name);
        sqlx::query(
            "INSERT INTO product_photos (product_id, content_type, bytes, etag) VALUES ($1, $2, $3, $4)
             ON CONFLICT (product_id) DO NOTHING",
        )
        .bind(product.id.to_string())
        .bind(photo::CONTENT_TYPE)
        .bind(&bytes)
        .bind(photo::etag(&bytes))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// Price and stock of products `1..=count` as the table holds them now (the changes continue
/// from there; a product missing from it starts at its seeded values).
async fn current(
    pool: &PgPool,
    table: &TableName,
    seeded: Vec<Product>,
) -> Result<Vec<Product>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT key, (state->>'price_cents')::bigint, (state->>'stock')::bigint FROM {table}"
    ))
    .fetch_all(pool)
    .await?;
    let mut products = seeded;
    for (key, price, stock) in rows {
        let Some(product) = key
            .parse::<u64>()
            .ok()
            .and_then(|id| products.get_mut((id as usize).wrapping_sub(1)))
        else {
            continue;
        };
        product.price_cents = price.unwrap_or(product.price_cents);
        product.stock = stock.unwrap_or(product.stock);
    }
    Ok(products)
}

/// The changes: a random product's price and/or stock, each with a newer version.
pub struct Changes {
    rng: StdRng,
    products: Vec<Product>,
    topic: String,
    last_version: i64,
}

impl Changes {
    pub fn new(seed: u64, products: Vec<Product>, topic: String) -> Changes {
        Changes {
            // Apart from the catalogue's stream: the same seed, the same changes.
            rng: StdRng::seed_from_u64(seed ^ 0x6368_616e_6765_7321),
            products,
            topic,
            last_version: 0,
        }
    }

    /// Microseconds of `now`, and always more than the last one: versions grow within a run
    /// and from one run to the next, with no state shared between runs.
    fn next_version(&mut self, now: DateTime<Utc>) -> i64 {
        self.last_version = now.timestamp_micros().max(self.last_version + 1);
        self.last_version
    }
}

impl RecordSource for Changes {
    fn next_record(&mut self, now: DateTime<Utc>) -> GeneratedRecord {
        let version = self.next_version(now);
        let index = self.rng.random_range(0..self.products.len());
        let (price, stock) = match self.rng.random_range(0..3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let product = &mut self.products[index];
        let mut changed = Vec::new();
        if price {
            // Within ±20 %, whole cents, never below one cent.
            let factor = self.rng.random_range(80..=120) as f64 / 100.0;
            product.price_cents = ((product.price_cents as f64 * factor).round() as i64).max(1);
            changed.push("price");
        }
        if stock {
            product.stock = (product.stock + self.rng.random_range(-20..=30)).max(0);
            changed.push("stock");
        }
        let body = json!({
            "id": product.id,
            "version": version,
            "price_cents": product.price_cents,
            "stock": product.stock,
            "changed": changed,
            "changed_at": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        GeneratedRecord {
            topic: self.topic.clone(),
            key: product.id.to_string(),
            headers: vec![
                ("service", "catalogue".into()),
                ("action", "product_change".into()),
            ],
            value: serde_json::to_vec(&body).expect("a json! value always serializes"),
        }
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }
}

/// What `eventpipe generate products` was asked for.
#[derive(Debug, Clone)]
pub struct GenerateProducts {
    pub products: u64,
    /// `None`: until stopped.
    pub count: Option<u64>,
    /// Changes per second; 0 = as fast as Kafka acknowledges.
    pub rate: u64,
    /// How often a burst of changes goes out (the timer).
    pub interval: Duration,
    pub seed: u64,
    pub topic: String,
    pub table: TableName,
}

/// What a run did, for the summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generated {
    pub created: u64,
    pub changes: u64,
}

/// Creates the catalogue if missing, then publishes changes until `count` or `shutdown`.
pub async fn generate(
    settings: &Settings,
    options: &GenerateProducts,
    shutdown: CancellationToken,
) -> anyhow::Result<Generated> {
    let pool = connect(settings.postgres_url.as_str(), &options.table).await?;
    let seeded = seeded(options.seed, options.products);
    let created = create(&pool, &options.table, &seeded).await?;
    let products = current(&pool, &options.table, seeded).await?;
    pool.close().await;
    let mut changes = Changes::new(options.seed, products, options.topic.clone());
    let pacer = (options.rate > 0).then(|| Pacer::with_tick(options.rate, options.interval));
    let sent = crate::generate::publish(
        &settings.kafka,
        &mut changes,
        options.count,
        pacer,
        None,
        shutdown,
    )
    .await?;
    Ok(Generated {
        created,
        changes: sent,
    })
}

/// `250ms`, `2s`, `1m`, or plain milliseconds: the generator's `--interval`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| "expected a whole number with ms, s or m (e.g. 250ms)".to_string())?;
    let interval = match unit {
        "" | "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return Err(format!("unknown unit {unit:?} (expected ms, s or m)")),
    };
    if interval < Duration::from_millis(1) {
        return Err("must be 1ms or more".into());
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_catalogue_and_changes() {
        assert_eq!(seeded(3, 50), seeded(3, 50));
        assert_ne!(seeded(3, 50), seeded(4, 50));
        let now = Utc::now();
        let mut a = Changes::new(3, seeded(3, 50), CHANGES_TOPIC.into());
        let mut b = Changes::new(3, seeded(3, 50), CHANGES_TOPIC.into());
        for _ in 0..200 {
            assert_eq!(a.next_record(now), b.next_record(now));
        }
    }

    #[test]
    fn changes_are_valid_keyed_by_id_with_growing_versions() {
        let rules = crate::materialise::change::Rules {
            version_field: "version".into(),
            non_negative: vec!["price_cents".into(), "stock".into()],
            max_value_bytes: 4096,
        };
        let mut changes = Changes::new(9, seeded(9, 5), CHANGES_TOPIC.into());
        let now = Utc::now();
        let mut last = 0;
        for _ in 0..1000 {
            let record = changes.next_record(now);
            let change = crate::materialise::change::parse(
                Some(record.key.as_bytes()),
                &record.value,
                &rules,
            )
            .unwrap();
            assert!(change.version > last);
            last = change.version;
            let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
            assert_eq!(value["id"].to_string(), record.key);
            assert!(!value["changed"].as_array().unwrap().is_empty());
        }
    }

    #[test]
    fn intervals_read_with_units() {
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("40"), Ok(Duration::from_millis(40)));
        assert!(parse_interval("0ms").is_err());
        assert!(parse_interval("3h").is_err());
        assert!(parse_interval("fast").is_err());
    }
}
