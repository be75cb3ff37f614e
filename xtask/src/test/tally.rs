//! The test count of a whole `cargo xtask test` run, from cargo test's `test result:` lines.

/// Passed and failed counts.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u64 = n
                .trim_start_matches("ok.")
                .trim_start_matches("FAILED.")
                .parse()
                .unwrap_or(0);
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }

    pub fn add_text(&mut self, text: &str) {
        text.lines().for_each(|l| self.add_line(l));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 17.68s");
        t.add_text(
            "test foo ... ok\ntest result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        assert_eq!(
            t,
            Tally {
                passed: 15,
                failed: 2
            }
        );
    }
}
