//! Byte sizes as people write them: `5GB` (decimal, as `transformers` reads `max_shard_size`),
//! `256MiB` (binary), or a plain number of bytes.

/// Parses `"5GB"`, `"256MiB"`, `"1.5GiB"`, `"4096"` into bytes.
///
/// ```
/// use mergestream::units::parse_size;
/// assert_eq!(parse_size("5GB"), Ok(5_000_000_000)); // decimal, as transformers reads it
/// assert_eq!(parse_size("256MiB"), Ok(256 << 20));
/// assert!(parse_size("5 parsecs").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let not_a_size = || format!("'{text}' is not a size (examples: 5GB, 256MiB, 4096)");
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let unusable = || format!("'{text}' is not a usable size");
    // Whole numbers exactly; fractions (1.5GiB) through f64.
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(scale)
            .filter(|&b| b >= 1)
            .ok_or_else(unusable);
    }
    let number: f64 = number.parse().map_err(|_| not_a_size())?;
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(unusable());
    }
    Ok(bytes as u64)
}

/// A byte count as a command line takes it (`5GB`, `256MiB`, `4096`) and prints it back: in
/// the unit that says it with the smallest whole number (`5GB`, not `4882812.5KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        parse_size(text).map(ByteSize)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(&str, u64); 8] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("TB", 1_000_000_000_000),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
        ];
        let bytes = self.0;
        let best = UNITS
            .iter()
            .filter(|(_, scale)| bytes >= *scale && bytes.is_multiple_of(*scale))
            .min_by_key(|(_, scale)| bytes / scale);
        match best {
            Some((unit, scale)) => write!(f, "{}{unit}", bytes / scale),
            None => write!(f, "{bytes}"),
        }
    }
}

/// `1.50 GB`, `312.0 MB`, `512 B`: decimal units, as disks and network speeds are quoted.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2 mb "), Ok(2_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_size("21428925795334169"), Ok(21428925795334169));
        assert!(parse_size("20000000TB").is_err());
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1_500_000_000), "1.50 GB");
        for (bytes, text) in [
            (5_000_000_000, "5GB"),
            (256 << 20, "256MiB"),
            (1_000_000_000_000, "1TB"),
            (3 << 29, "1536MiB"),
            (4097, "4097"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text);
        }
    }

    proptest::proptest! {
        /// What a size prints as parses back to the same size.
        #[test]
        fn byte_sizes_round_trip(bytes in 1u64..u64::MAX / 2, shift in 0u32..40) {
            for b in [bytes, (bytes >> shift).max(1) << shift.min(20), (bytes % 1000 + 1) * 1_000_000] {
                let text = ByteSize(b).to_string();
                proptest::prop_assert_eq!(parse_size(&text), Ok(b), "{}", text);
            }
        }
    }
}
