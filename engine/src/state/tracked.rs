//! A map that remembers which keys changed since its last delta: the unit
//! of the engine's incremental checkpoints.
//!
//! Every mutation goes through a method that marks its key; a delta is the
//! changed keys with their value now (`None` for a removed key), so its size
//! follows what changed, not what is kept. Applying a full image and then
//! every delta, in order, to an empty map gives the map again.

use std::hash::{BuildHasher, Hash};

use hashbrown::{DefaultHashBuilder, HashMap, HashSet};
use serde::de::DeserializeOwned;
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

/// A hash map with change tracking. Tracking can be switched off (a replay
/// that only writes a full image at its end keeps no change set).
#[derive(Debug, Clone)]
pub(crate) struct Tracked<K, V, S = DefaultHashBuilder> {
    map: HashMap<K, V, S>,
    dirty: HashSet<K, S>,
    track: bool,
}

impl<K, V, S: Default> Default for Tracked<K, V, S> {
    fn default() -> Self {
        Tracked { map: HashMap::default(), dirty: HashSet::default(), track: true }
    }
}

impl<K, V, S> Tracked<K, V, S>
where
    K: Eq + Hash + Copy,
    S: BuildHasher + Default,
{
    pub(crate) fn set_tracking(&mut self, on: bool) {
        self.track = on;
        if !on {
            self.dirty = HashSet::default();
        }
    }

    fn mark(&mut self, key: K) {
        if self.track {
            self.dirty.insert(key);
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// The value for `key`, marked changed.
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let Tracked { map, dirty, track } = self;
        let v = map.get_mut(key)?;
        if *track {
            dirty.insert(*key);
        }
        Some(v)
    }

    /// Updates the value for `key`, or inserts `make()`; marked changed.
    pub(crate) fn upsert(&mut self, key: K, make: impl FnOnce() -> V, update: impl FnOnce(&mut V)) -> &mut V {
        self.mark(key);
        match self.map.entry(key) {
            hashbrown::hash_map::Entry::Occupied(o) => {
                let v = o.into_mut();
                update(v);
                v
            }
            hashbrown::hash_map::Entry::Vacant(slot) => slot.insert(make()),
        }
    }

    /// The value for `key`, inserted as `V::default()` when absent; marked changed.
    pub(crate) fn get_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        self.mark(key);
        self.map.entry(key).or_default()
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.mark(key);
        self.map.insert(key, value)
    }

    /// Keeps the entries for which `keep` returns true; it may change the
    /// value it keeps, which is then marked changed when `keep` says so
    /// through its second result.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> (bool, bool)) {
        let (track, dirty) = (self.track, &mut self.dirty);
        self.map.retain(|k, v| {
            let (kept, changed) = keep(k, v);
            if track && (!kept || changed) {
                dirty.insert(*k);
            }
            kept
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn iter(&self) -> hashbrown::hash_map::Iter<'_, K, V> {
        self.map.iter()
    }

    pub(crate) fn values(&self) -> hashbrown::hash_map::Values<'_, K, V> {
        self.map.values()
    }

    /// Keys changed since the last delta.
    pub(crate) fn changed(&self) -> usize {
        self.dirty.len()
    }
}

impl<K, V, S> Tracked<K, V, S>
where
    K: Eq + Hash + Copy + Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
    S: BuildHasher + Default,
{
    /// The changed entries (`None`: removed), then forgets them.
    pub(crate) fn take_delta(&mut self) -> Delta<'_, K, V, S> {
        let keys = std::mem::take(&mut self.dirty);
        Delta { map: &self.map, keys: Keys::Changed(keys) }
    }

    /// Every entry, as a delta from an empty map.
    pub(crate) fn full(&self) -> Delta<'_, K, V, S> {
        Delta { map: &self.map, keys: Keys::All }
    }

    /// Applies a delta (or a full image) read back.
    pub(crate) fn apply(&mut self, entries: Vec<(K, Option<V>)>) {
        for (k, v) in entries {
            match v {
                Some(v) => {
                    self.map.insert(k, v);
                }
                None => {
                    self.map.remove(&k);
                }
            }
        }
    }

    /// Forgets the change set (after a restore or a full image).
    pub(crate) fn clear_changes(&mut self) {
        self.dirty.clear();
    }
}

enum Keys<K, S> {
    Changed(HashSet<K, S>),
    All,
}

/// Entries to serialize: changed keys with their value (or `None`), or all.
pub(crate) struct Delta<'a, K, V, S> {
    map: &'a HashMap<K, V, S>,
    keys: Keys<K, S>,
}

impl<K, V, S> Serialize for Delta<'_, K, V, S>
where
    K: Eq + Hash + Serialize,
    V: Serialize,
    S: BuildHasher,
{
    fn serialize<Ser: Serializer>(&self, ser: Ser) -> Result<Ser::Ok, Ser::Error> {
        match &self.keys {
            Keys::All => {
                let mut seq = ser.serialize_seq(Some(self.map.len()))?;
                for (k, v) in self.map {
                    seq.serialize_element(&(k, Some(v)))?;
                }
                seq.end()
            }
            Keys::Changed(keys) => {
                let mut seq = ser.serialize_seq(Some(keys.len()))?;
                for k in keys {
                    seq.serialize_element(&(k, self.map.get(k)))?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type M = Tracked<u32, String>;

    fn round(m: &mut M) -> Vec<(u32, Option<String>)> {
        let bytes = postcard::to_stdvec(&m.take_delta()).unwrap();
        postcard::from_bytes(&bytes).unwrap()
    }

    fn image(m: &M) -> Vec<(u32, Option<String>)> {
        postcard::from_bytes(&postcard::to_stdvec(&m.full()).unwrap()).unwrap()
    }

    fn sorted(m: &M) -> Vec<(u32, String)> {
        let mut v: Vec<_> = m.iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort();
        v
    }

    #[test]
    fn base_plus_deltas_equals_the_map_through_every_kind_of_change() {
        let mut live = M::default();
        live.insert(1, "a".into());
        live.insert(2, "b".into());
        live.insert(3, "c".into());
        let mut copy = M::default();
        copy.apply(image(&live));
        live.clear_changes();
        let mut deltas = Vec::new();
        // Changes of every kind: update, default-insert, remove, retain.
        live.get_mut(&1).unwrap().push('!');
        live.get_or_default(4).push('d');
        live.retain(|k, _| (*k != 2, false));
        deltas.push(round(&mut live));
        live.retain(|k, v| {
            if *k == 3 {
                v.push('?');
                (true, true)
            } else {
                (*k != 4, false)
            }
        });
        live.insert(5, "e".into());
        deltas.push(round(&mut live));
        assert_eq!(live.changed(), 0);
        for d in deltas {
            copy.apply(d);
        }
        assert_eq!(sorted(&copy), sorted(&live));
        assert_eq!(sorted(&live), [(1, "a!".into()), (3, "c?".into()), (5, "e".into())]);
    }

    #[test]
    fn a_delta_holds_only_what_changed() {
        let mut m = M::default();
        for i in 0..1000 {
            m.insert(i, i.to_string());
        }
        m.clear_changes();
        m.get_mut(&7).unwrap().push('x');
        assert_eq!(m.get_mut(&5000), None, "a missing key is not marked");
        assert_eq!(round(&mut m), [(7, Some("7x".to_string()))]);
        assert!(round(&mut m).is_empty());
    }

    #[test]
    fn no_tracking_keeps_no_change_set() {
        let mut m = M::default();
        m.set_tracking(false);
        m.insert(1, "a".into());
        m.get_or_default(2);
        assert_eq!(m.changed(), 0);
    }
}
