//! Scans: every shard at once, merged in key order without silent gaps.

use strata_proto::v1 as pb;

use super::retry::Target;
use super::Client;
use crate::error::Error;
use crate::{Record, ScanOptions, ScanPage};

impl Client {
    /// Scans every shard and merges the results in key order: the first page of at most
    /// `opts.limit` records of the range, and whether more follow.
    pub async fn scan(&self, opts: ScanOptions) -> Result<ScanPage, Error> {
        let table = match self.table() {
            Some(t) => t,
            None => self.refresh_map().await?,
        };
        let scans = table.shards.iter().map(|s| self.scan_shard(s.id, &opts));
        let mut pages = Vec::new();
        for r in futures::future::join_all(scans).await {
            pages.push(r?);
        }
        let limit = if opts.limit == 0 {
            1000
        } else {
            opts.limit as usize
        };
        Ok(merge_pages(pages, limit))
    }

    /// Scans one shard: its first page of the range.
    pub async fn scan_shard(&self, shard: u64, opts: &ScanOptions) -> Result<ScanPage, Error> {
        let req = pb::ScanRequest {
            shard_id: shard,
            start: opts.start.clone(),
            end: opts.end.clone(),
            prefix: opts.prefix.clone(),
            limit: opts.limit,
            consistency: opts.consistency as i32,
        };
        let r = self
            .run(Target::Shard(shard), false, |mut c| {
                let req = req.clone();
                async move { c.scan(req).await }
            })
            .await?;
        let records = r
            .items
            .into_iter()
            .map(|kv| Record {
                key: kv.key,
                value: kv.value,
                version: kv.version,
            })
            .collect();
        Ok(ScanPage {
            records,
            more: r.more,
        })
    }
}

/// Merges the shards' pages into one page of at most `limit` records in key order. A shard
/// whose page ended early has not shown its keys past its last record, so the merged page stops
/// at the smallest such key: keeping another shard's later keys would leave a silent gap.
fn merge_pages(pages: Vec<ScanPage>, limit: usize) -> ScanPage {
    let cut = pages
        .iter()
        .filter(|p| p.more)
        .filter_map(|p| p.records.last())
        .map(|r| r.key.clone())
        .min();
    let mut more = pages.iter().any(|p| p.more);
    let mut records: Vec<Record> = pages
        .into_iter()
        .flat_map(|p| p.records)
        .filter(|r| cut.as_ref().is_none_or(|c| r.key <= *c))
        .collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    if records.len() > limit {
        records.truncate(limit);
        more = true;
    }
    ScanPage { records, more }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::merge_pages;
    use crate::{Record, ScanPage};

    fn page(keys: &[&str], more: bool) -> ScanPage {
        let records = keys
            .iter()
            .map(|k| Record {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::new(),
                version: 1,
            })
            .collect();
        ScanPage { records, more }
    }

    fn keys(p: &ScanPage) -> Vec<&[u8]> {
        p.records.iter().map(|r| r.key.as_ref()).collect()
    }

    #[test]
    fn a_merged_scan_stops_where_a_shard_stopped_early() {
        // Shard 1 was capped after "c": its "d" may exist, so "e" and "f" must not be returned.
        let m = merge_pages(
            vec![page(&["a", "c"], true), page(&["b", "e", "f"], false)],
            10,
        );
        assert_eq!(keys(&m), [b"a", b"b", b"c"]);
        assert!(m.more);
        assert_eq!(m.next_start().as_deref(), Some(&b"c\0"[..]));
        // No shard stopped early and everything fits: the whole range, nothing more.
        let m = merge_pages(vec![page(&["a", "c"], false), page(&["b"], false)], 10);
        assert_eq!(keys(&m), [b"a", b"b", b"c"]);
        assert!(!m.more);
        assert_eq!(m.next_start(), None);
        // The limit cuts the merged range: more follow.
        let m = merge_pages(vec![page(&["a", "c"], false), page(&["b"], false)], 2);
        assert_eq!(keys(&m), [b"a", b"b"]);
        assert!(m.more);
    }
}
