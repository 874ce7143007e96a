//! The namespace's own records, read or made when a process connects: its format
//! (`NS.meta.format`) and its secret (`NS.meta.secret` with the mark `NS.meta.keyed`).

use super::*;

impl NatsStore {
    /// The namespace's secret (`NS.meta.secret`): created by the first process to connect, the
    /// others read it; a namespace written before secrets existed gets one keyed after its head.
    pub(super) async fn load_secret(&self) -> Result<NamespaceSecret, StoreError> {
        let subject = format!("{}.meta.secret", self.inner.ns);
        let unusable = |reason: String| StoreError::Unusable {
            path: format!("{}/{}", self.inner.url, self.inner.ns),
            reason,
        };
        // Written with the secret: a secret lost later is then refused, not replaced.
        let keyed = format!("{}.meta.keyed", self.inner.ns);
        let mut lost = false;
        for _ in 0..RACE_RETRIES {
            // The mark is read before the secret: both are written in one atomic batch, so a
            // mark seen means its secret is readable. Read the other way round, a process
            // starting beside the creator could miss the secret, then see the mark, and call
            // the secret lost. A replica that lags may still answer the second read: asked
            // again before the secret is called lost.
            let marked = self.last(&keyed).await?.is_some();
            if let Some(entry) = self.last(&subject).await? {
                return NamespaceSecret::from_bytes(&entry.payload).map_err(unusable);
            }
            if marked {
                lost = true;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            lost = false;
            let secret = NamespaceSecret::generate(self.head().await?);
            let claim = Outgoing {
                subject: subject.clone(),
                payload: secret.to_bytes(),
                expect: Some(0),
                expect_subject: None,
                rollup: false,
                erases: None,
            };
            let mark = Outgoing {
                subject: keyed.clone(),
                payload: b"1".to_vec(),
                expect: None,
                expect_subject: None,
                rollup: true,
                erases: None,
            };
            match self.publish(vec![claim, mark]).await {
                Ok(_) => return Ok(secret),
                // Another process created it first: read theirs.
                Err(BatchRefused::Raced) => continue,
                Err(BatchRefused::Other(e)) => return Err(e),
            }
        }
        Err(unusable(if lost {
            crate::store::secret::lost()
        } else {
            "the namespace secret could not be created or read".into()
        }))
    }

    /// Marks a new namespace with the format; refuses one of another format.
    pub(super) async fn check_format(&self) -> Result<(), StoreError> {
        let subject = format!("{}.meta.format", self.inner.ns);
        match self.last(&subject).await? {
            Some(entry) if entry.payload.as_ref() == FORMAT.as_bytes() => Ok(()),
            Some(entry) => Err(StoreError::Unusable {
                path: format!("{}/{}", self.inner.url, self.inner.ns),
                reason: format!(
                    "it holds format {:?}, this Ferry reads {FORMAT}",
                    String::from_utf8_lossy(&entry.payload)
                ),
            }),
            None => {
                let claim = Outgoing {
                    subject,
                    payload: FORMAT.as_bytes().to_vec(),
                    expect: Some(0),
                    expect_subject: None,
                    rollup: false,
                    erases: None,
                };
                match self.publish(vec![claim]).await {
                    Ok(_) | Err(BatchRefused::Raced) => Ok(()),
                    Err(BatchRefused::Other(e)) => Err(e),
                }
            }
        }
    }
}
