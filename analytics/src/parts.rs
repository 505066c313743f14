//! Names of `delivery_events` files, and which files of a directory a reader sees.
//!
//! The sink names the file of flush `seq` `part-<seq:020>-<n:04><lateness>.parquet`; it covers
//! the sequence numbers `seq..=seq`. Compaction ([`crate::compact`]) merges the files of one
//! directory and one [`Lateness`] whose sequence numbers form a run `from..=to` into
//! `part-<from:020>-to-<to:020><lateness>.parquet`. Such a name says which files it replaces:
//! **a file is hidden when another file of the same directory and lateness covers a range
//! that contains its own**. So the merged file, once in place, replaces its inputs for every
//! reader that applies this rule ([`crate::view::CompactedView`]) in one step, whether or not
//! the inputs are deleted yet; compaction deletes them afterwards, and deletes any hidden file
//! it finds later (what a crash left behind).

use crate::stats::Lateness;
use std::collections::BTreeMap;

/// A `delivery_events` file name the sink or compaction wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartName {
    /// The first sequence number covered.
    pub(crate) from: u64,
    /// The last sequence number covered.
    pub(crate) to: u64,
    pub(crate) lateness: Lateness,
}

impl PartName {
    /// Parses `part-<seq>-<n><lateness>.parquet` or `part-<from>-to-<to><lateness>.parquet`;
    /// `None` for any other name (a file this module leaves alone).
    pub(crate) fn parse(name: &str) -> Option<PartName> {
        let lateness = Lateness::of_file(name)?;
        let stem = name
            .strip_prefix("part-")?
            .strip_suffix(".parquet")?
            .strip_suffix(lateness.suffix())?;
        let (from, rest) = stem.split_once('-')?;
        let from = digits(from)?;
        let to = match rest.strip_prefix("to-") {
            Some(to) => digits(to)?,
            None => {
                digits(rest)?;
                from
            }
        };
        (from <= to).then_some(PartName { from, to, lateness })
    }

    /// The name of the file that merges the files of `lateness` covering `from..=to`.
    pub(crate) fn compacted(from: u64, to: u64, lateness: Lateness) -> String {
        format!("part-{from:020}-to-{to:020}{}.parquet", lateness.suffix())
    }

    /// Whether `self` replaces `other`: same lateness, a different range containing `other`'s.
    fn covers(&self, other: &PartName) -> bool {
        self.lateness == other.lateness
            && self.from <= other.from
            && other.to <= self.to
            && (self.from, self.to) != (other.from, other.to)
    }
}

fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Which of `names` (the files of one directory) are hidden by another (module docs), as a
/// flag per name.
pub(crate) fn hidden(names: &[&str]) -> Vec<bool> {
    let parsed: Vec<Option<PartName>> = names.iter().map(|n| PartName::parse(n)).collect();
    // Per lateness, the widest ranges are few: compare every part with every compacted one.
    let compacted: Vec<PartName> = parsed
        .iter()
        .flatten()
        .filter(|p| p.from != p.to)
        .copied()
        .collect();
    parsed
        .iter()
        .map(|p| p.is_some_and(|p| compacted.iter().any(|c| c.covers(&p))))
        .collect()
}

/// Keeps the items a reader sees: groups `items` by directory (`dir_and_name` splits an item's
/// key) and drops the hidden ones, keeping the order of the rest.
pub(crate) fn retain_visible<T>(items: &mut Vec<T>, dir_and_name: impl Fn(&T) -> (&str, &str)) {
    let mut dirs: BTreeMap<&str, Vec<(usize, &str)>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let (dir, name) = dir_and_name(item);
        dirs.entry(dir).or_default().push((i, name));
    }
    let mut hide = vec![false; items.len()];
    for files in dirs.values() {
        let names: Vec<&str> = files.iter().map(|(_, n)| *n).collect();
        for ((i, _), hidden) in files.iter().zip(hidden(&names)) {
            hide[*i] = hidden;
        }
    }
    let mut flags = hide.into_iter();
    items.retain(|_| !flags.next().unwrap_or(false));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_and_compacted_names_parse_with_their_range_and_lateness() {
        let p = |n: &str| PartName::parse(n).map(|p| (p.from, p.to, p.lateness));
        let seq7 = "part-00000000000000000007-0003.parquet";
        assert_eq!(p(seq7), Some((7, 7, Lateness::OnTime)));
        assert_eq!(
            p("part-00000000000000000007-0000-late_minute.parquet"),
            Some((7, 7, Lateness::LateMinute))
        );
        let merged = PartName::compacted(3, 9, Lateness::LateHour);
        assert_eq!(
            merged,
            "part-00000000000000000003-to-00000000000000000009-late_hour.parquet"
        );
        assert_eq!(p(&merged), Some((3, 9, Lateness::LateHour)));
        let on_time = PartName::compacted(3, 9, Lateness::OnTime);
        assert_eq!(Lateness::of_file(&on_time), Some(Lateness::OnTime));
        for other in [
            "stats.parquet",
            "part-x-0001.parquet",
            "part-00000000000000000009-to-00000000000000000003.parquet",
            "part-00000000000000000009.parquet",
            "part-1-to-.parquet",
        ] {
            assert_eq!(p(other), None, "{other}");
        }
    }

    #[test]
    fn a_merged_file_hides_the_files_it_covers_of_its_lateness_only() {
        let one =
            |seq: u64, late: Lateness| format!("part-{seq:020}-0000{}.parquet", late.suffix());
        let names = [
            one(1, Lateness::OnTime),
            one(2, Lateness::OnTime),
            one(2, Lateness::LateHour),
            one(5, Lateness::OnTime),
            PartName::compacted(1, 4, Lateness::OnTime),
            PartName::compacted(1, 2, Lateness::OnTime),
            "other.parquet".to_string(),
        ];
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(
            hidden(&names),
            [true, true, false, false, false, true, false]
        );

        let mut keys: Vec<String> = ["a/x", "b/x"]
            .iter()
            .flat_map(|d| names.iter().map(move |n| format!("{d}/{n}")))
            .collect();
        keys.push(format!("c/{}", one(2, Lateness::OnTime)));
        retain_visible(&mut keys, |k| k.rsplit_once('/').unwrap());
        assert_eq!(keys.len(), 2 * 4 + 1);
        assert!(keys.last().unwrap().starts_with("c/"));
    }
}
