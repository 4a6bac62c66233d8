//! Following a paged listing (`backups list`, `jobs list`, `audit list`):
//! the coordinator answers at most a page per call, so no answer outgrows a
//! message however large the catalog; the CLI asks for pages until it has
//! what was asked for.

use std::future::Future;

/// Rows asked for per call (the coordinator's own maximum).
const PAGE_ROWS: u32 = 1000;

/// Calls `fetch(page_token, rows)` page after page until `limit` rows
/// (`None`: all of them) or the last page; `fetch` answers a page and the
/// token of the next one (empty: none).
pub async fn collect<T, F, Fut>(limit: Option<u32>, mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String, u32) -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let wanted = match limit {
            Some(limit) => limit.saturating_sub(rows.len() as u32).min(PAGE_ROWS),
            None => PAGE_ROWS,
        };
        if wanted == 0 {
            return Ok(rows);
        }
        let (page, next) = fetch(token, wanted).await?;
        rows.extend(page);
        if next.is_empty() {
            return Ok(rows);
        }
        token = next;
    }
}
