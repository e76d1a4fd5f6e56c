//! Metadata context queries (proto.md "Metadata querying"): which of the contexts an export
//! offers a `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` query selects.

use crate::wire::Queries;

/// True if `query` selects the context `name`.
///
/// - `SET` selects exact names only. `base:` and other empty leaves select nothing
///   (proto.md: `base:` "MUST be ignored" by SET; an empty leaf "SHOULD NOT select
///   anything"), and unknown names are ignored.
/// - `LIST` also treats a query ending in `:` as a prefix: `base:` lists every `base:`
///   context, `qemu:` every `qemu:` one, and `qemu:dirty-bitmap:` every dirty bitmap, as
///   QEMU does.
/// - A query without a namespace (no `:`) selects nothing.
pub fn query_matches(query: &str, name: &str, list: bool) -> bool {
    let Some(colon) = query.find(':') else {
        return false;
    };
    if query == name {
        return colon + 1 < query.len();
    }
    list && query.ends_with(':') && name.starts_with(query)
}

/// True if any of `queries` selects `name`; with no query at all, `LIST` selects every
/// context and `SET` none (proto.md).
pub fn any_matches(queries: Queries<'_>, name: &str, list: bool) -> bool {
    if queries.is_empty() {
        return list;
    }
    queries.iter().any(|q| query_matches(q, name, list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_selects_exact_names_only() {
        assert!(query_matches("base:allocation", "base:allocation", false));
        assert!(!query_matches("base:", "base:allocation", false));
        assert!(!query_matches("qemu:", "qemu:allocation-depth", false));
        assert!(!query_matches("base:allocatio", "base:allocation", false));
        assert!(!query_matches("allocation", "allocation", false));
        assert!(query_matches(
            "qemu:dirty-bitmap:bm0",
            "qemu:dirty-bitmap:bm0",
            false
        ));
    }

    #[test]
    fn list_treats_empty_leaves_as_prefixes() {
        assert!(query_matches("base:", "base:allocation", true));
        assert!(query_matches("qemu:", "qemu:dirty-bitmap:bm0", true));
        assert!(query_matches(
            "qemu:dirty-bitmap:",
            "qemu:dirty-bitmap:bm0",
            true
        ));
        assert!(!query_matches(
            "qemu:dirty-bitmap:",
            "qemu:allocation-depth",
            true
        ));
        assert!(!query_matches("x-foo:", "base:allocation", true));
        assert!(!query_matches(":", "base:allocation", true));
    }

    #[test]
    fn no_queries() {
        assert!(any_matches(Queries::new(&[]), "base:allocation", true));
        assert!(!any_matches(Queries::new(&[]), "base:allocation", false));
        assert!(any_matches(
            Queries::new(&["x:y", "base:allocation"]),
            "base:allocation",
            false
        ));
    }
}
