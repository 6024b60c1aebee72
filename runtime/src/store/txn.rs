//! TEMPORARY until the store recovery branch lands.
use super::*;

impl Store {
    pub fn update<R: Record>(&self, key: &str, f: impl FnOnce(&mut R) -> Result<()>) -> Result<R> {
        let txn = self.db.begin_write().map_err(store_err)?;
        let record = {
            let mut t = txn.open_table(table::<R>()).map_err(store_err)?;
            let mut record = match t.get(key).map_err(store_err)? {
                Some(v) => decode::<R>(key, v.value())?,
                None => return Err(Error::NotFound(format!("{} {key} not found", R::TABLE))),
            };
            f(&mut record)?;
            let bytes = serde_json::to_vec(&Envelope {
                version: R::VERSION,
                record: &record,
            })
            .map_err(store_err)?;
            t.insert(key, bytes.as_slice()).map_err(store_err)?;
            record
        };
        txn.commit().map_err(store_err)?;
        Ok(record)
    }

    pub fn insert_new<R: Record>(&self, record: &R) -> Result<()> {
        let bytes = serde_json::to_vec(&Envelope {
            version: R::VERSION,
            record,
        })
        .map_err(store_err)?;
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = txn.open_table(table::<R>()).map_err(store_err)?;
            if t.get(record.key()).map_err(store_err)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "{} {} exists",
                    R::TABLE,
                    record.key()
                )));
            }
            t.insert(record.key(), bytes.as_slice())
                .map_err(store_err)?;
        }
        txn.commit().map_err(store_err)
    }
}
