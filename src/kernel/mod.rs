//! TEMPORARY stand-in until the kernel branch lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    BF16,
    F16,
    F32,
}
impl FloatDtype {
    pub const fn size(self) -> usize {
        match self {
            FloatDtype::BF16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
}
impl Isa {
    pub fn select() -> Result<Isa, String> {
        Ok(Isa::Scalar)
    }
    pub fn name(self) -> &'static str {
        "scalar"
    }
}
pub fn expo(_isa: Isa, dtype: FloatDtype, alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    match dtype {
        FloatDtype::BF16 => {
            for ((a, s), o) in a
                .chunks_exact(2)
                .zip(s.chunks_exact(2))
                .zip(out.chunks_exact_mut(2))
            {
                let a = f32::from_bits((u16::from_le_bytes([a[0], a[1]]) as u32) << 16);
                let s = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                let d = a - s;
                let t = alpha * d;
                let r = a + t;
                let b = if r.is_nan() {
                    0x7FC0
                } else {
                    let x = r.to_bits();
                    ((x + 0x7FFF + ((x >> 16) & 1)) >> 16) as u16
                };
                o.copy_from_slice(&b.to_le_bytes());
            }
        }
        _ => unimplemented!(),
    }
}
