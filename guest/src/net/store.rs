//! The key-value store: a fixed open-addressing hash table (FNV-1a, linear
//! probing, tombstones), no heap. Lives in `.netbss` (all zero = empty).

pub const CAPACITY: usize = 1024;
pub const MAX_KEY: usize = 128;
pub const MAX_VALUE: usize = 512;

const EMPTY: u8 = 0;
const LIVE: u8 = 1;
const DELETED: u8 = 2;

#[repr(C)]
pub struct Entry {
    state: u8,
    key_len: u8,
    value_len: u16,
    key: [u8; MAX_KEY],
    value: [u8; MAX_VALUE],
}

#[repr(C)]
pub struct Store {
    entries: [Entry; CAPACITY],
    live: usize,
}

pub enum SetError {
    KeyTooLong,
    ValueTooLong,
    Full,
}

fn hash(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as usize
}

impl Store {
    fn find(&self, key: &[u8]) -> Option<usize> {
        if key.len() > MAX_KEY {
            return None;
        }
        let start = hash(key);
        for i in 0..CAPACITY {
            let slot = (start + i) % CAPACITY;
            let e = &self.entries[slot];
            match e.state {
                EMPTY => return None,
                LIVE if usize::from(e.key_len) == key.len() && &e.key[..key.len()] == key => {
                    return Some(slot)
                }
                _ => {}
            }
        }
        None
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key).map(|i| {
            let e = &self.entries[i];
            &e.value[..usize::from(e.value_len)]
        })
    }

    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), SetError> {
        if key.len() > MAX_KEY {
            return Err(SetError::KeyTooLong);
        }
        if value.len() > MAX_VALUE {
            return Err(SetError::ValueTooLong);
        }
        let slot = match self.find(key) {
            Some(i) => i,
            None => {
                if self.live >= CAPACITY {
                    return Err(SetError::Full);
                }
                // The first free (empty or deleted) slot on the probe path.
                let start = hash(key);
                let mut found = None;
                for i in 0..CAPACITY {
                    let slot = (start + i) % CAPACITY;
                    if self.entries[slot].state != LIVE {
                        found = Some(slot);
                        break;
                    }
                }
                let Some(slot) = found else {
                    return Err(SetError::Full);
                };
                let e = &mut self.entries[slot];
                e.state = LIVE;
                e.key_len = key.len() as u8;
                e.key[..key.len()].copy_from_slice(key);
                self.live += 1;
                slot
            }
        };
        let e = &mut self.entries[slot];
        e.value_len = value.len() as u16;
        e.value[..value.len()].copy_from_slice(value);
        Ok(())
    }

    pub fn del(&mut self, key: &[u8]) -> bool {
        match self.find(key) {
            Some(i) => {
                self.entries[i].state = DELETED;
                self.live -= 1;
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn clear(&mut self) {
        for e in self.entries.iter_mut() {
            e.state = EMPTY;
        }
        self.live = 0;
    }
}
