//! The stable partition function: which `tally.v1.usage.<partition>` a leaf subject's events use.

use crate::Subject;

/// Partitions per stream unless configured otherwise (SPEC §2).
pub const DEFAULT_PARTITIONS: u16 = 16;
/// Upper bound on partitions: each one is a subject token and, later, a consumer; more than this
/// would only spread a 2-core deployment thinner.
pub const MAX_PARTITIONS: u16 = 1024;

/// FNV-1a (64-bit) of the subject's text, mod `partitions`. FNV is fixed by its definition, so the
/// mapping never changes between builds, platforms or Rust versions (std's hasher may).
pub fn partition_of(subject: &Subject, partitions: u16) -> u16 {
    assert!(
        partitions > 0 && partitions <= MAX_PARTITIONS,
        "partitions out of range"
    );
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = subject
        .as_str()
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(partitions)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_known_values() {
        // Pinned values: changing the function would silently reorder history.
        let s = Subject::parse("key:k_1").unwrap();
        assert_eq!(partition_of(&s, 16), partition_of(&s, 16));
        let fnv = "key:k_1".bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        assert_eq!(u64::from(partition_of(&s, 16)), fnv % 16);
        assert_eq!(partition_of(&Subject::parse("user:u_7").unwrap(), 1), 0);
    }

    #[test]
    fn spreads_over_partitions() {
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            let s = Subject::parse(&format!("key:k_{i}")).unwrap();
            seen[partition_of(&s, 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "skewed: {seen:?}");
    }
}
