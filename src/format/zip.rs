//! A strict reader for the ZIP archives `torch.save` writes: the directory structures only.
//!
//! [`Archive::read`] (from an open file) and [`Archive::parse_bytes`] (from memory) share one
//! path that finds the end-of-central-directory record (searching at most the last
//! 22 + 65 535 bytes, and only where a record and its comment end exactly at the end of the
//! file), follows the ZIP64 locator and record when present (as PyTorch always writes them),
//! parses the central directory (bounded in size and member count), then reads every member's
//! local header and cross-checks it against the directory: same name, flags and method, sizes and
//! CRC equal or deferred to a data descriptor, which is read and checked too. Member names must
//! be unique, valid UTF-8 relative paths without `.`/`..` components, backslashes or control
//! characters. Every member's local header, data and descriptor must lie before the central
//! directory, and together they must tile the file from byte 0 to the directory exactly: no
//! overlap, no gap, no hidden bytes. Encrypted members are refused.
//!
//! What it gives: each [`Member`]'s absolute data offset and length, so that callers read tensor
//! bytes with positioned reads in chunks of their choosing, and [`Archive::read_member`] for the
//! few small records (`data.pkl`, `byteorder`, `version`) that are read whole, bounded and CRC
//! checked. It never reads a tensor storage, and it never decompresses: it reports each member's
//! method and [`Archive::read_member`] refuses compressed ones (`torch.save` stores everything;
//! the caller decides how to word the refusal for tensor storages).
//!
//! Why by hand and not a crate: `rawzip` (zero dependencies, positioned reads,
//! `compressed_data_range()` gives absolute offsets) and `zip` (`data_start()`) were considered.
//! Both would work as parsers, but (a) their errors are coarse (`InvalidInput { msg }`, `Eof`,
//! `InvalidArchive(&str)`), so the specific, typed refusals this project promises would have to
//! be recovered from message strings; (b) they are deliberately lenient where we want strictness
//! (rawzip detects a shifted archive start and silently rebases every offset, searches 1 MiB for
//! the end record, leaves local-name cross-checks, duplicates and overlap detection to the
//! caller; zip accepts prefixed archives too); and (c) the subset `torch.save` writes (stored
//! members, data descriptors, ZIP64 records and extra fields) is small and fixed. With the checks
//! we need on top, a crate would have saved little code and added a parser we do not control on
//! the path of every untrusted input. The format here follows PKWARE's APPNOTE 6.3.x, §4.3.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Most members an archive may have (`torch.save` writes one per storage plus six records).
pub const MAX_MEMBERS: u64 = 1 << 20;

/// Largest central directory read into memory (about 100 bytes per `torch.save` member).
pub const MAX_DIRECTORY_LEN: u64 = 128 << 20;

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

const EOCD_LEN: u64 = 22;
const MAX_COMMENT_LEN: u64 = 0xFFFF;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_LEN: u64 = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: u64 = 30;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// General purpose flag bits (APPNOTE 4.4.4).
const FLAG_ENCRYPTED: u16 = 1 << 0;
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_STRONG_ENCRYPTION: u16 = 1 << 6;
const FLAG_MASKED_HEADERS: u16 = 1 << 13;

/// Compression method of a stored (uncompressed) member.
pub const METHOD_STORED: u16 = 0;

/// Everything that can be wrong with an archive's structure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZipError {
    /// A read failed.
    #[error("reading the {what}: {source}")]
    Io {
        /// Which structure.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is too short to hold an end-of-central-directory record.
    #[error("not a ZIP archive: {len} bytes is too short for one")]
    TooShort {
        /// The file's length.
        len: u64,
    },
    /// No end-of-central-directory record ends the file (not a ZIP archive, or a truncated one).
    #[error("not a complete ZIP archive: no end-of-central-directory record ends the file (searched its last {searched} bytes); is it truncated?")]
    NoEndOfCentralDirectory {
        /// How many bytes at the end of the file were searched.
        searched: u64,
    },
    /// A structure does not start with its signature.
    #[error("the {what} at byte {offset} does not start with its signature")]
    BadSignature {
        /// Which structure.
        what: &'static str,
        /// Its file offset.
        offset: u64,
    },
    /// The archive says it spans several disks.
    #[error("the archive spans several disks, which is not supported")]
    MultiDisk,
    /// The ZIP64 end record disagrees with the classic one.
    #[error(
        "the ZIP64 end-of-central-directory record disagrees with the classic one on the {field}"
    )]
    Zip64Mismatch {
        /// The field that disagrees.
        field: &'static str,
    },
    /// The central directory is not where the end records say, or not adjacent to them.
    #[error("the central directory (bytes {offset}..{end}) does not end where the end-of-central-directory records begin (byte {expected})")]
    DirectoryMisplaced {
        /// Where the directory starts, as recorded.
        offset: u64,
        /// Where it ends, by its recorded size.
        end: u64,
        /// Where the end records begin.
        expected: u64,
    },
    /// The central directory is larger than [`MAX_DIRECTORY_LEN`].
    #[error("the central directory is {len} bytes; the limit is {max}")]
    DirectoryTooLarge {
        /// The directory's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// More members than [`MAX_MEMBERS`], or more than the directory can hold.
    #[error("the archive declares {count} members, more than {max} (or more than its central directory can hold)")]
    TooManyMembers {
        /// The count declared.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A central directory entry runs past the end of the directory.
    #[error("central directory entry {index} runs past the end of the directory")]
    DirectoryEntryOverrun {
        /// The entry, from 0.
        index: u64,
    },
    /// The directory's entries do not fill it exactly.
    #[error("the central directory's {declared} entries use {used} of its {len} bytes")]
    DirectoryLength {
        /// Entries declared.
        declared: u64,
        /// Bytes the entries use.
        used: u64,
        /// The directory's length in bytes.
        len: u64,
    },
    /// An extra field block is malformed.
    #[error("member '{member}': malformed extra field in its {header} header")]
    BadExtraField {
        /// The member.
        member: String,
        /// Which header: local or central.
        header: &'static str,
    },
    /// A field set to its ZIP64 marker has no value in the ZIP64 extra field.
    #[error("member '{member}': the {field} needs a ZIP64 extra field, which is missing or short")]
    Zip64FieldMissing {
        /// The member.
        member: String,
        /// The field set to its ZIP64 marker.
        field: &'static str,
    },
    /// A member is encrypted.
    #[error("member '{member}' is encrypted")]
    Encrypted {
        /// The member.
        member: String,
    },
    /// A member name is not UTF-8.
    #[error("a member name is not valid UTF-8 ('{lossy}')")]
    NameNotUtf8 {
        /// The name, with invalid bytes replaced.
        lossy: String,
    },
    /// A member name is empty, absolute, has `.`/`..`/empty components, backslashes or control
    /// characters.
    #[error("member name '{name}' is not a plain relative path")]
    UnsafeName {
        /// The name.
        name: String,
    },
    /// Two members have the same name.
    #[error("member '{name}' appears twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A local header disagrees with the central directory.
    #[error(
        "member '{member}': its local header disagrees with the central directory on the {field}"
    )]
    LocalHeaderMismatch {
        /// The member.
        member: String,
        /// The field that disagrees.
        field: &'static str,
    },
    /// A data descriptor disagrees with the central directory.
    #[error("member '{member}': its data descriptor disagrees with the central directory")]
    DescriptorMismatch {
        /// The member.
        member: String,
    },
    /// A stored member's two sizes differ.
    #[error("member '{member}' is stored uncompressed but its sizes differ ({compressed} and {uncompressed} bytes)")]
    StoredSizeMismatch {
        /// The member.
        member: String,
        /// Its compressed size.
        compressed: u64,
        /// Its uncompressed size.
        uncompressed: u64,
    },
    /// A member's header, data or descriptor runs into the central directory.
    #[error("member '{member}' runs to byte {end}, past the start of the central directory (byte {limit})")]
    DataOutOfBounds {
        /// The member.
        member: String,
        /// Where it ends (file offset).
        end: u64,
        /// Where the central directory starts.
        limit: u64,
    },
    /// Two members' headers, data or descriptors overlap.
    #[error("members '{first}' and '{second}' overlap")]
    Overlap {
        /// One member.
        first: String,
        /// The other member.
        second: String,
    },
    /// Bytes before the central directory that belong to no member.
    #[error("bytes {start}..{end} belong to no member")]
    UnaccountedBytes {
        /// First unaccounted byte.
        start: u64,
        /// One past the last unaccounted byte.
        end: u64,
    },
    /// [`Archive::read_member`] was asked for a compressed member.
    #[error("member '{member}' is compressed (method {method}); only stored members are read")]
    Compressed {
        /// The member.
        member: String,
        /// Its compression method.
        method: u16,
    },
    /// [`Archive::read_member`] was asked for a member larger than its bound.
    #[error("member '{member}' is {len} bytes; the limit for it is {max}")]
    MemberTooLarge {
        /// The member.
        member: String,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A member's bytes do not match its CRC-32.
    #[error("member '{member}': CRC-32 mismatch (directory says {expected:08x}, data gives {actual:08x})")]
    Crc {
        /// The member.
        member: String,
        /// The CRC the directory records.
        expected: u32,
        /// The CRC of the member's bytes.
        actual: u32,
    },
}

type Result<T, E = ZipError> = std::result::Result<T, E>;

/// One member of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name, a relative path (`archive/data/0`).
    pub name: String,
    /// Compression method ([`METHOD_STORED`] for what `torch.save` writes).
    pub method: u16,
    /// CRC-32 of the uncompressed bytes, from the central directory.
    pub crc32: u32,
    /// Absolute file offset of the member's local header.
    pub header_offset: u64,
    /// Absolute file offset of the member's data.
    pub data_start: u64,
    /// Bytes of data on disk (the compressed size; the size, for a stored member).
    pub len: u64,
    /// Size once decompressed.
    pub uncompressed_len: u64,
}

impl Member {
    /// Absolute file offset one past the member's data.
    pub fn data_end(&self) -> u64 {
        self.data_start + self.len
    }

    /// Whether it is stored uncompressed, as `torch.save` writes every member.
    pub fn is_stored(&self) -> bool {
        self.method == METHOD_STORED
    }
}

/// A validated archive: its members, in central directory order.
#[derive(Debug, Clone)]
pub struct Archive {
    /// Every member, in central directory order.
    pub members: Vec<Member>,
    by_name: HashMap<String, usize>,
}

impl Archive {
    /// Reads and validates the structure of the archive `file`, `file_len` bytes long.
    pub fn read(file: &File, file_len: u64) -> Result<Archive> {
        Archive::read_with(file_len, |buf, at| file.read_exact_at(buf, at))
    }

    /// [`Archive::read`] from memory, through the same code.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Archive> {
        Archive::read_with(bytes.len() as u64, slice_reader(bytes))
    }

    /// [`Archive::read`] over any source: `read_at(buf, offset)` fills `buf` from `offset`.
    pub fn read_with(
        file_len: u64,
        mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> Result<Archive> {
        let end = find_end(file_len, &mut read_at)?;
        let entries = read_directory(&end, &mut read_at)?;
        let mut by_name = HashMap::with_capacity(entries.len());
        for (i, (m, _)) in entries.iter().enumerate() {
            if by_name.insert(m.name.clone(), i).is_some() {
                return Err(ZipError::DuplicateName {
                    name: m.name.clone(),
                });
            }
        }
        let mut members = Vec::with_capacity(entries.len());
        let mut extents = Vec::with_capacity(entries.len());
        for (mut m, flags) in entries {
            extents.push(check_local(
                &mut m,
                flags,
                end.directory_offset,
                &mut read_at,
            )?);
            members.push(m);
        }
        check_tiling(&members, &extents, end.directory_offset)?;
        Ok(Archive { members, by_name })
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.by_name.get(name).map(|&i| &self.members[i])
    }

    /// Reads a whole stored member of at most `max` bytes and checks its CRC-32.
    pub fn read_member(
        &self,
        member: &Member,
        max: u64,
        mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> Result<Vec<u8>> {
        if !member.is_stored() {
            return Err(ZipError::Compressed {
                member: member.name.clone(),
                method: member.method,
            });
        }
        if member.len > max {
            return Err(ZipError::MemberTooLarge {
                member: member.name.clone(),
                len: member.len,
                max,
            });
        }
        let mut buf = vec![0u8; member.len as usize];
        read_at(&mut buf, member.data_start).map_err(|source| ZipError::Io {
            what: "member data",
            source,
        })?;
        let actual = crc32(&buf);
        if actual != member.crc32 {
            return Err(ZipError::Crc {
                member: member.name.clone(),
                expected: member.crc32,
                actual,
            });
        }
        Ok(buf)
    }
}

/// A `read_at` over bytes in memory; reading past the end is `UnexpectedEof`.
pub fn slice_reader(bytes: &[u8]) -> impl FnMut(&mut [u8], u64) -> io::Result<()> + '_ {
    move |buf, at| {
        let src = usize::try_from(at)
            .ok()
            .and_then(|at| bytes.get(at..)?.get(..buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// What the end records say.
#[derive(Debug)]
struct End {
    entries: u64,
    directory_offset: u64,
    directory_len: u64,
}

/// Finds and checks the end-of-central-directory record (and the ZIP64 ones before it).
fn find_end(
    file_len: u64,
    read_at: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<End> {
    if file_len < EOCD_LEN {
        return Err(ZipError::TooShort { len: file_len });
    }
    let tail_len = file_len.min(EOCD_LEN + MAX_COMMENT_LEN);
    let tail_start = file_len - tail_len;
    let mut tail = vec![0u8; tail_len as usize];
    read_at(&mut tail, tail_start).map_err(|source| ZipError::Io {
        what: "end of the archive",
        source,
    })?;
    // The record nearest the end whose comment ends exactly at the end of the file.
    let mut found = None;
    for at in (0..=tail.len() - EOCD_LEN as usize).rev() {
        if u32_at(&tail, at) == EOCD_SIG
            && at + EOCD_LEN as usize + u16_at(&tail, at + 20) as usize == tail.len()
        {
            found = Some(at);
            break;
        }
    }
    let Some(at) = found else {
        return Err(ZipError::NoEndOfCentralDirectory { searched: tail_len });
    };
    let eocd_offset = tail_start + at as u64;
    let r = &tail[at..at + EOCD_LEN as usize];
    let (disk, directory_disk) = (u16_at(r, 4), u16_at(r, 6));
    let (entries_here, entries) = (u16_at(r, 8), u16_at(r, 10));
    let (directory_len, directory_offset) = (u32_at(r, 12), u32_at(r, 16));

    let mut end = End {
        entries: entries.into(),
        directory_offset: directory_offset.into(),
        directory_len: directory_len.into(),
    };
    // Where the central directory must end: at the ZIP64 record if there is one, else here.
    let mut directory_end = eocd_offset;

    let has_locator = eocd_offset >= ZIP64_LOCATOR_LEN && {
        let mut sig = [0u8; 4];
        read_at(&mut sig, eocd_offset - ZIP64_LOCATOR_LEN).map_err(|source| ZipError::Io {
            what: "ZIP64 end-of-central-directory locator",
            source,
        })?;
        u32::from_le_bytes(sig) == ZIP64_LOCATOR_SIG
    };
    if has_locator {
        let locator_offset = eocd_offset - ZIP64_LOCATOR_LEN;
        let mut l = [0u8; ZIP64_LOCATOR_LEN as usize];
        read_at(&mut l, locator_offset).map_err(|source| ZipError::Io {
            what: "ZIP64 end-of-central-directory locator",
            source,
        })?;
        let (record_disk, record_offset, disks) = (u32_at(&l, 4), u64_at(&l, 8), u32_at(&l, 16));
        if record_disk != 0 || disks > 1 {
            return Err(ZipError::MultiDisk);
        }
        if record_offset > locator_offset || locator_offset - record_offset < ZIP64_EOCD_LEN {
            return Err(ZipError::BadSignature {
                what: "ZIP64 end-of-central-directory record",
                offset: record_offset,
            });
        }
        let mut z = [0u8; ZIP64_EOCD_LEN as usize];
        read_at(&mut z, record_offset).map_err(|source| ZipError::Io {
            what: "ZIP64 end-of-central-directory record",
            source,
        })?;
        if u32_at(&z, 0) != ZIP64_EOCD_SIG {
            return Err(ZipError::BadSignature {
                what: "ZIP64 end-of-central-directory record",
                offset: record_offset,
            });
        }
        // The record's size field counts what follows it; with any extensible data the record
        // must still end at the locator.
        if record_offset
            .checked_add(12)
            .and_then(|o| o.checked_add(u64_at(&z, 4)))
            != Some(locator_offset)
        {
            return Err(ZipError::Zip64Mismatch {
                field: "record size",
            });
        }
        let (disk64, directory_disk64) = (u32_at(&z, 16), u32_at(&z, 20));
        let (entries_here64, entries64) = (u64_at(&z, 24), u64_at(&z, 32));
        let (directory_len64, directory_offset64) = (u64_at(&z, 40), u64_at(&z, 48));
        if disk64 != 0 || directory_disk64 != 0 || entries_here64 != entries64 {
            return Err(ZipError::MultiDisk);
        }
        // Each classic field is either the ZIP64 value or its "see ZIP64" marker.
        let agrees = |classic: u64, marker: u64, wide: u64| classic == wide || classic == marker;
        if !agrees(entries.into(), 0xFFFF, entries64)
            || !agrees(entries_here.into(), 0xFFFF, entries64)
        {
            return Err(ZipError::Zip64Mismatch {
                field: "number of members",
            });
        }
        if !agrees(directory_len.into(), 0xFFFF_FFFF, directory_len64) {
            return Err(ZipError::Zip64Mismatch {
                field: "central directory size",
            });
        }
        if !agrees(directory_offset.into(), 0xFFFF_FFFF, directory_offset64) {
            return Err(ZipError::Zip64Mismatch {
                field: "central directory offset",
            });
        }
        if disk != 0 && disk != 0xFFFF || directory_disk != 0 && directory_disk != 0xFFFF {
            return Err(ZipError::MultiDisk);
        }
        end = End {
            entries: entries64,
            directory_offset: directory_offset64,
            directory_len: directory_len64,
        };
        directory_end = record_offset;
    } else if disk != 0 || directory_disk != 0 || entries_here != entries {
        return Err(ZipError::MultiDisk);
    }

    if end.directory_offset.checked_add(end.directory_len) != Some(directory_end) {
        return Err(ZipError::DirectoryMisplaced {
            offset: end.directory_offset,
            end: end.directory_offset.saturating_add(end.directory_len),
            expected: directory_end,
        });
    }
    if end.directory_len > MAX_DIRECTORY_LEN {
        return Err(ZipError::DirectoryTooLarge {
            len: end.directory_len,
            max: MAX_DIRECTORY_LEN,
        });
    }
    if end.entries > MAX_MEMBERS || end.entries * CENTRAL_LEN as u64 > end.directory_len {
        return Err(ZipError::TooManyMembers {
            count: end.entries,
            max: MAX_MEMBERS,
        });
    }
    Ok(end)
}

/// Parses the central directory into members (data offsets still unknown), each with its
/// general purpose flags.
fn read_directory(
    end: &End,
    read_at: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<Vec<(Member, u16)>> {
    let mut dir = vec![0u8; end.directory_len as usize];
    read_at(&mut dir, end.directory_offset).map_err(|source| ZipError::Io {
        what: "central directory",
        source,
    })?;
    let mut members = Vec::with_capacity(end.entries as usize);
    let mut at = 0usize;
    for index in 0..end.entries {
        let overrun = || ZipError::DirectoryEntryOverrun { index };
        let fixed = dir.get(at..at + CENTRAL_LEN).ok_or_else(overrun)?;
        if u32_at(fixed, 0) != CENTRAL_SIG {
            return Err(ZipError::BadSignature {
                what: "central directory entry",
                offset: end.directory_offset + at as u64,
            });
        }
        let flags = u16_at(fixed, 8);
        let method = u16_at(fixed, 10);
        let crc32 = u32_at(fixed, 16);
        let (compressed, uncompressed) = (u32_at(fixed, 20), u32_at(fixed, 24));
        let (name_len, extra_len, comment_len) = (
            u16_at(fixed, 28) as usize,
            u16_at(fixed, 30) as usize,
            u16_at(fixed, 32) as usize,
        );
        let disk = u16_at(fixed, 34);
        let header_offset = u32_at(fixed, 42);
        let var_end = at + CENTRAL_LEN + name_len + extra_len + comment_len;
        let var = dir.get(at + CENTRAL_LEN..var_end).ok_or_else(overrun)?;
        let name = member_name(&var[..name_len])?;
        let extra = &var[name_len..name_len + extra_len];
        at = var_end;

        let zip64 = find_extra(extra, ZIP64_EXTRA_ID).ok_or_else(|| ZipError::BadExtraField {
            member: name.clone(),
            header: "central",
        })?;
        let mut wide = Zip64Fields::new(&name, zip64.unwrap_or(&[]));
        let uncompressed_len = wide.take_if_marked(uncompressed, "size")?;
        let len = wide.take_if_marked(compressed, "compressed size")?;
        let header_offset = wide.take_if_marked(header_offset, "local header offset")?;
        if disk == 0xFFFF {
            wide.take_disk()?;
        } else if disk != 0 {
            return Err(ZipError::MultiDisk);
        }

        if flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION | FLAG_MASKED_HEADERS) != 0 {
            return Err(ZipError::Encrypted { member: name });
        }
        if method == METHOD_STORED && len != uncompressed_len {
            return Err(ZipError::StoredSizeMismatch {
                member: name,
                compressed: len,
                uncompressed: uncompressed_len,
            });
        }
        members.push((
            Member {
                name,
                method,
                crc32,
                header_offset,
                data_start: 0,
                len,
                uncompressed_len,
            },
            flags,
        ));
    }
    if at as u64 != end.directory_len {
        return Err(ZipError::DirectoryLength {
            declared: end.entries,
            used: at as u64,
            len: end.directory_len,
        });
    }
    Ok(members)
}

/// Values of a ZIP64 extended information extra field, taken in the APPNOTE's order for the
/// fields whose classic value is the marker `0xFFFFFFFF`.
struct Zip64Fields<'a> {
    member: &'a str,
    rest: &'a [u8],
}

impl<'a> Zip64Fields<'a> {
    fn new(member: &'a str, data: &'a [u8]) -> Self {
        Zip64Fields { member, rest: data }
    }

    fn take_if_marked(&mut self, classic: u32, field: &'static str) -> Result<u64> {
        if classic != 0xFFFF_FFFF {
            return Ok(classic.into());
        }
        let Some((value, rest)) = self.rest.split_first_chunk::<8>() else {
            return Err(ZipError::Zip64FieldMissing {
                member: self.member.to_owned(),
                field,
            });
        };
        self.rest = rest;
        Ok(u64::from_le_bytes(*value))
    }

    fn take_disk(&mut self) -> Result<()> {
        let Some((value, rest)) = self.rest.split_first_chunk::<4>() else {
            return Err(ZipError::Zip64FieldMissing {
                member: self.member.to_owned(),
                field: "disk number",
            });
        };
        self.rest = rest;
        if u32::from_le_bytes(*value) != 0 {
            return Err(ZipError::MultiDisk);
        }
        Ok(())
    }
}

/// The data of extra field `id`, if present; `None` if the extra block is malformed.
fn find_extra(mut extra: &[u8], id: u16) -> Option<Option<&[u8]>> {
    let mut found = None;
    while !extra.is_empty() {
        let (head, rest) = extra.split_first_chunk::<4>()?;
        let (field, len) = (u16_at(head, 0), u16_at(head, 2) as usize);
        let data = rest.get(..len)?;
        if field == id {
            if found.is_some() {
                return None;
            }
            found = Some(data);
        }
        extra = &rest[len..];
    }
    Some(found)
}

/// A member name as UTF-8, checked to be a plain relative path.
fn member_name(raw: &[u8]) -> Result<String> {
    let name = std::str::from_utf8(raw).map_err(|_| ZipError::NameNotUtf8 {
        lossy: String::from_utf8_lossy(raw).into_owned(),
    })?;
    let unsafe_name = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.chars().any(char::is_control)
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if unsafe_name {
        return Err(ZipError::UnsafeName {
            name: name.to_owned(),
        });
    }
    Ok(name.to_owned())
}

/// Reads and checks `m`'s local header (and data descriptor), sets `m.data_start`, and returns
/// the end of everything the member occupies.
fn check_local(
    m: &mut Member,
    flags: u16,
    directory_offset: u64,
    read_at: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<u64> {
    let out_of_bounds = |end: u64| ZipError::DataOutOfBounds {
        member: m.name.clone(),
        end,
        limit: directory_offset,
    };
    let fixed_end = m.header_offset.saturating_add(LOCAL_LEN);
    if fixed_end > directory_offset {
        return Err(out_of_bounds(fixed_end));
    }
    let mut fixed = [0u8; LOCAL_LEN as usize];
    read_at(&mut fixed, m.header_offset).map_err(|source| ZipError::Io {
        what: "local header",
        source,
    })?;
    if u32_at(&fixed, 0) != LOCAL_SIG {
        return Err(ZipError::BadSignature {
            what: "local header",
            offset: m.header_offset,
        });
    }
    let mismatch = |field| ZipError::LocalHeaderMismatch {
        member: m.name.clone(),
        field,
    };
    let local_flags = u16_at(&fixed, 6);
    if local_flags != flags {
        return Err(mismatch("flags"));
    }
    if u16_at(&fixed, 8) != m.method {
        return Err(mismatch("compression method"));
    }
    let deferred = flags & FLAG_DESCRIPTOR != 0;
    // A local value agrees if it is the directory's, the ZIP64 marker (sizes), or zero when the
    // data descriptor carries the real value.
    let agrees = |local: u32, central: u64, marker: bool| {
        u64::from(local) == central || (marker && local == 0xFFFF_FFFF) || (deferred && local == 0)
    };
    if !agrees(u32_at(&fixed, 14), m.crc32.into(), false) {
        return Err(mismatch("CRC-32"));
    }
    if !agrees(u32_at(&fixed, 18), m.len, true)
        || !agrees(u32_at(&fixed, 22), m.uncompressed_len, true)
    {
        return Err(mismatch("sizes"));
    }
    let (name_len, extra_len) = (u16_at(&fixed, 26) as u64, u16_at(&fixed, 28) as u64);
    if name_len != m.name.len() as u64 {
        return Err(mismatch("name"));
    }
    let var_end = fixed_end + name_len + extra_len;
    if var_end > directory_offset {
        return Err(out_of_bounds(var_end));
    }
    let mut var = vec![0u8; (name_len + extra_len) as usize];
    read_at(&mut var, fixed_end).map_err(|source| ZipError::Io {
        what: "local header",
        source,
    })?;
    if &var[..name_len as usize] != m.name.as_bytes() {
        return Err(mismatch("name"));
    }
    let local_zip64 = find_extra(&var[name_len as usize..], ZIP64_EXTRA_ID)
        .ok_or_else(|| ZipError::BadExtraField {
            member: m.name.clone(),
            header: "local",
        })?
        .is_some();

    m.data_start = var_end;
    let data_end = var_end
        .checked_add(m.len)
        .filter(|&e| e <= directory_offset)
        .ok_or_else(|| out_of_bounds(var_end.saturating_add(m.len)))?;
    if !deferred {
        return Ok(data_end);
    }

    // The descriptor: optional signature, CRC-32, then both sizes, 8 bytes each when the local
    // header has a ZIP64 field (APPNOTE 4.3.9).
    let size_len = if local_zip64 { 8 } else { 4 };
    let mut d = [0u8; 24];
    let room = (directory_offset - data_end).min(24) as usize;
    read_at(&mut d[..room], data_end).map_err(|source| ZipError::Io {
        what: "data descriptor",
        source,
    })?;
    let signed = room >= 4 && u32_at(&d, 0) == DESCRIPTOR_SIG;
    let body = if signed { 4 } else { 0 };
    let len = body + 4 + 2 * size_len;
    if len > room {
        return Err(out_of_bounds(data_end + len as u64));
    }
    let size = |at: usize| {
        if size_len == 8 {
            u64_at(&d, at)
        } else {
            u32_at(&d, at).into()
        }
    };
    if u32_at(&d, body) != m.crc32
        || size(body + 4) != m.len
        || size(body + 4 + size_len) != m.uncompressed_len
    {
        return Err(ZipError::DescriptorMismatch {
            member: m.name.clone(),
        });
    }
    Ok(data_end + len as u64)
}

/// Members, each from its local header to the end of its data or descriptor, must tile
/// `[0, directory_offset)` exactly.
fn check_tiling(members: &[Member], extents: &[u64], directory_offset: u64) -> Result<()> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| members[i].header_offset);
    let mut at = 0u64;
    let mut previous: Option<usize> = None;
    for i in order {
        let start = members[i].header_offset;
        if start < at {
            let first = previous.map_or_else(String::new, |p| members[p].name.clone());
            return Err(ZipError::Overlap {
                first,
                second: members[i].name.clone(),
            });
        }
        if start > at {
            return Err(ZipError::UnaccountedBytes {
                start: at,
                end: start,
            });
        }
        at = extents[i];
        previous = Some(i);
    }
    if at != directory_offset {
        return Err(ZipError::UnaccountedBytes {
            start: at,
            end: directory_offset,
        });
    }
    Ok(())
}

/// CRC-32 (IEEE 802.3, reflected, as ZIP uses it).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn names_must_be_plain_relative_paths() {
        for ok in ["a/data.pkl", "archive/data/0", "x"] {
            assert!(member_name(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "a/../b", "..", "a/./b", "a//b", "dir/", "a\\b", "a\u{0}b", "a\nb",
        ] {
            assert!(
                matches!(
                    member_name(bad.as_bytes()),
                    Err(ZipError::UnsafeName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            member_name(&[0x61, 0xFF]),
            Err(ZipError::NameNotUtf8 { .. })
        ));
    }

    #[test]
    fn extra_fields_must_fill_their_block() {
        let ok = [1, 0, 2, 0, 9, 9, 0x55, 0x54, 0, 0];
        assert_eq!(find_extra(&ok, 1), Some(Some(&[9u8, 9][..])));
        assert_eq!(find_extra(&ok, 7), Some(None));
        assert_eq!(
            find_extra(&[1, 0, 3, 0, 9], 1),
            None,
            "field runs past the block"
        );
        assert_eq!(find_extra(&[1, 0], 1), None, "header cut short");
        assert_eq!(find_extra(&[1, 0, 0, 0, 1, 0, 0, 0], 1), None, "twice");
    }

    #[test]
    fn short_and_empty_inputs_are_refused() {
        assert!(matches!(
            Archive::parse_bytes(b"PK\x05\x06"),
            Err(ZipError::TooShort { len: 4 })
        ));
        assert!(matches!(
            Archive::parse_bytes(&[0u8; 100]),
            Err(ZipError::NoEndOfCentralDirectory { searched: 100 })
        ));
        // An empty archive is valid and has no members.
        let mut empty = EOCD_SIG.to_le_bytes().to_vec();
        empty.resize(22, 0);
        assert!(Archive::parse_bytes(&empty).unwrap().members.is_empty());
    }
}
