//! Where a projection's tables live. The serving ("live") tables are in `public`; a rebuild
//! writes the same tables in `tally_rebuild` and swaps them in by moving schemas in one
//! transaction, so index and constraint names never clash and readers see the old tables or the
//! new ones, never a mix.

/// The schema serving tables live in.
pub const LIVE_SCHEMA: &str = "public";
/// The schema a rebuild writes in.
pub const REBUILD_SCHEMA: &str = "tally_rebuild";
/// Where the replaced tables go for the moment of the swap (then dropped).
pub const RETIRED_SCHEMA: &str = "tally_retired";

/// The physical names of a projection's tables: live, or being rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    schema: &'static str,
}

impl Tables {
    /// The serving tables.
    pub const LIVE: Tables = Tables {
        schema: LIVE_SCHEMA,
    };
    /// The tables a rebuild writes.
    pub const REBUILD: Tables = Tables {
        schema: REBUILD_SCHEMA,
    };

    /// The schema-qualified name of table `base`.
    pub fn name(&self, base: &str) -> String {
        format!("{}.{base}", self.schema)
    }

    /// The schema.
    pub fn schema(&self) -> &'static str {
        self.schema
    }

    /// A projection's DDL for these tables: `{schema}` replaced.
    pub fn ddl(&self, template: &str) -> String {
        template.replace("{schema}", self.schema)
    }

    /// The checkpoint key of a projection in these tables.
    pub fn checkpoint_key(&self, projection: &str) -> String {
        if self.schema == LIVE_SCHEMA {
            projection.to_owned()
        } else {
            format!("{projection}__rebuild")
        }
    }
}
