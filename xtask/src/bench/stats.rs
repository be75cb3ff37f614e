//! The one statistics module of the benchmarks: what they report of a series of samples.

/// (min, median, max) of `v`; the median of an even count is the mean of the middle two.
/// All NaN when there are no samples (every benchmark runs at least once, so it never prints).
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let (Some(&min), Some(&max)) = (s.first(), s.last()) else {
        return (f64::NAN, f64::NAN, f64::NAN);
    };
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    };
    (min, median, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_min_median_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
    }

    #[test]
    fn one_sample_is_its_own_min_median_and_max() {
        assert_eq!(stats(&[7.5]), (7.5, 7.5, 7.5));
    }

    #[test]
    fn no_samples_is_nan_not_a_panic() {
        let (lo, mid, hi) = stats(&[]);
        assert!(lo.is_nan() && mid.is_nan() && hi.is_nan());
    }

    #[test]
    fn the_input_order_does_not_matter_and_is_left_alone() {
        let v = [5.0, -1.0, 2.0, 9.0, 0.5];
        assert_eq!(stats(&v), (-1.0, 2.0, 9.0));
        assert_eq!(v, [5.0, -1.0, 2.0, 9.0, 0.5]);
    }
}
