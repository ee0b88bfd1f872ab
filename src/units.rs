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
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (examples: 5GB, 256MiB, 4096)"))?;
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
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{text}' is not a usable size"));
    }
    Ok(bytes as u64)
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
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1_500_000_000), "1.50 GB");
    }
}
