//! Aggregation functions over one series in one window: count, sum, avg, min, max (exact) and
//! p50/p90/p99 (DDSketch, 1% relative error). Exact sums use Shewchuk partials: order never matters.

use std::collections::BTreeMap;

/// The functions an input event may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Function {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    P50,
    P90,
    P99,
}

impl Function {
    pub const ALL: [Function; 8] = [
        Function::Count,
        Function::Sum,
        Function::Avg,
        Function::Min,
        Function::Max,
        Function::P50,
        Function::P90,
        Function::P99,
    ];

    pub fn parse(name: &str) -> Option<Function> {
        Function::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Function::Count => "count",
            Function::Sum => "sum",
            Function::Avg => "avg",
            Function::Min => "min",
            Function::Max => "max",
            Function::P50 => "p50",
            Function::P90 => "p90",
            Function::P99 => "p99",
        }
    }

    fn quantile(self) -> Option<f64> {
        match self {
            Function::P50 => Some(0.5),
            Function::P90 => Some(0.9),
            Function::P99 => Some(0.99),
            _ => None,
        }
    }
}

/// The exact sum of f64 values, rounded once (to nearest, ties to even) when read.
///
/// A plain `+=` loop rounds after every addition, so the result depends on the order events
/// arrive in — a replay after a crash or a different partition interleaving would change the
/// last bits. The partials hold the sum without any rounding error, so the value is the
/// correctly rounded sum of the exact inputs, whatever their order. Typically 1–3 partials.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExactSum {
    partials: Vec<f64>,
}

impl ExactSum {
    pub fn add(&mut self, mut x: f64) {
        let mut kept = 0;
        for i in 0..self.partials.len() {
            let mut y = self.partials[i];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.partials.truncate(kept);
        self.partials.push(x);
    }

    /// The correctly rounded sum (Python's `fsum` final step, including its half-way fix-up).
    pub fn value(&self) -> f64 {
        let p = &self.partials;
        let Some(mut n) = p.len().checked_sub(1) else {
            return 0.0;
        };
        let mut hi = p[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = p[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }
}

/// Relative accuracy of the percentile sketch.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;

/// A DDSketch (Masson, Rim, Lee, VLDB 2019): values counted in logarithmic buckets, so a quantile
/// is returned with relative error at most `SKETCH_RELATIVE_ERROR`: for the exact value x at
/// rank ⌊q·(n−1)⌋ of the sorted inputs, the result v satisfies |v − x| ≤ 0.01·|x|. Mergeable
/// (bucket counts add) and order-independent, so replays give identical results. Size: one
/// bucket per 2% band of magnitude actually seen (about 1,050 buckets span 1e-3..1e6).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantileSketch {
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
}

impl QuantileSketch {
    fn gamma() -> f64 {
        (1.0 + SKETCH_RELATIVE_ERROR) / (1.0 - SKETCH_RELATIVE_ERROR)
    }

    /// Bucket i holds magnitudes in (γ^(i−1), γ^i].
    fn index(magnitude: f64) -> i32 {
        (magnitude.ln() / Self::gamma().ln()).ceil() as i32
    }

    /// The value whose relative distance to both bucket bounds is α.
    fn representative(index: i32) -> f64 {
        let gamma = Self::gamma();
        2.0 * gamma.powi(index) / (gamma + 1.0)
    }

    pub fn add(&mut self, value: f64) {
        self.count += 1;
        // Below this a logarithmic index is meaningless; such values count as zero.
        if value.abs() < 1e-300 {
            self.zeros += 1;
        } else if value > 0.0 {
            *self.positive.entry(Self::index(value)).or_default() += 1;
        } else {
            *self.negative.entry(Self::index(-value)).or_default() += 1;
        }
    }

    /// The q-quantile (0 ≤ q ≤ 1) within the relative error; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0;
        for (index, n) in self.negative.iter().rev() {
            seen += n;
            if seen > rank {
                return -Self::representative(*index);
            }
        }
        seen += self.zeros;
        if seen > rank {
            return 0.0;
        }
        for (index, n) in &self.positive {
            seen += n;
            if seen > rank {
                return Self::representative(*index);
            }
        }
        self.positive
            .keys()
            .next_back()
            .map_or(0.0, |i| Self::representative(*i))
    }
}

/// Running state of one (name, function) series in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    count: u64,
    sum: ExactSum,
    min: f64,
    max: f64,
    /// Only percentile series pay for a sketch.
    sketch: Option<Box<QuantileSketch>>,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator {
            count: 0,
            sum: ExactSum::default(),
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sketch: None,
        }
    }
}

impl Accumulator {
    pub fn add(&mut self, function: Function, value: f64) {
        self.count += 1;
        match function {
            Function::Count => {}
            Function::Sum | Function::Avg => self.sum.add(value),
            Function::Min => self.min = self.min.min(value),
            Function::Max => self.max = self.max.max(value),
            Function::P50 | Function::P90 | Function::P99 => {
                self.sketch.get_or_insert_default().add(value)
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The aggregate; avg is the exact sum rounded once, divided by the count (one more rounding).
    pub fn value(&self, function: Function) -> f64 {
        match function {
            Function::Count => self.count as f64,
            Function::Sum => self.sum.value(),
            Function::Avg => self.sum.value() / self.count.max(1) as f64,
            Function::Min => self.min,
            Function::Max => self.max,
            Function::P50 | Function::P90 | Function::P99 => {
                let q = function.quantile().expect("a percentile function");
                self.sketch.as_ref().map_or(f64::NAN, |s| s.quantile(q))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[f64]) -> f64 {
        let mut s = ExactSum::default();
        values.iter().for_each(|v| s.add(*v));
        s.value()
    }

    #[test]
    fn exact_sum_does_not_depend_on_order() {
        // Naive summation gives 0.0 or 2.0 depending on order; the exact sum is 2.0.
        assert_eq!(exact(&[1e100, 1.0, -1e100, 1.0]), 2.0);
        assert_eq!(exact(&[0.1, 0.2, 0.3]), 0.6);
        assert_ne!(0.1 + 0.2 + 0.3, 0.6, "the naive sum is off by one ulp");
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut values: Vec<f64> = (0..2000)
            .map(|_| rng.random_range(-1e6..1e6) * 10f64.powi(rng.random_range(-8..8)))
            .collect();
        let first = exact(&values);
        for _ in 0..20 {
            values.shuffle(&mut rng);
            assert_eq!(exact(&values).to_bits(), first.to_bits());
        }
    }

    #[test]
    fn exact_sum_matches_integer_arithmetic() {
        // Values that are exact multiples of 2^-10 sum exactly in i128 too.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let units: Vec<i64> = (0..5000)
            .map(|_| rng.random_range(-1_000_000_000i64..1_000_000_000))
            .collect();
        let values: Vec<f64> = units.iter().map(|u| *u as f64 / 1024.0).collect();
        let expected = units.iter().map(|u| *u as i128).sum::<i128>() as f64 / 1024.0;
        assert_eq!(exact(&values), expected);
    }

    #[test]
    fn accumulator_computes_each_function() {
        let values = [3.0, -1.5, 10.25, 4.0];
        let get = |f: Function| {
            let mut a = Accumulator::default();
            values.iter().for_each(|v| a.add(f, *v));
            a.value(f)
        };
        assert_eq!(get(Function::Count), 4.0);
        assert_eq!(get(Function::Sum), 15.75);
        assert_eq!(get(Function::Avg), 15.75 / 4.0);
        assert_eq!(get(Function::Min), -1.5);
        assert_eq!(get(Function::Max), 10.25);
        assert_eq!(Function::parse("avg"), Some(Function::Avg));
        assert_eq!(Function::parse("median"), None);
    }

    #[test]
    fn percentiles_are_within_the_documented_relative_error() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..50 {
            let n = rng.random_range(1..3000);
            let mut values: Vec<f64> = (0..n)
                .map(|_| {
                    let v = rng.random_range(0.001..1e6) * if round % 3 == 0 { -1.0 } else { 1.0 };
                    if rng.random_range(0..20) == 0 {
                        0.0
                    } else {
                        v
                    }
                })
                .collect();
            let mut a = Accumulator::default();
            values.iter().for_each(|v| a.add(Function::P90, *v));
            values.sort_by(f64::total_cmp);
            for (f, q) in [
                (Function::P50, 0.5),
                (Function::P90, 0.9),
                (Function::P99, 0.99),
            ] {
                let mut b = Accumulator::default();
                values.iter().rev().for_each(|v| b.add(f, *v));
                let exact = values[(q * (n - 1) as f64).floor() as usize];
                let estimate = b.value(f);
                assert!(
                    (estimate - exact).abs() <= SKETCH_RELATIVE_ERROR * exact.abs() * (1.0 + 1e-9),
                    "round {round} q {q}: {estimate} vs {exact}"
                );
            }
            assert_eq!(a.count(), n as u64);
        }
    }
}
