//! What herald's readers see of the warehouse: an [`ObjectStore`] that lists only the files a
//! reader should see ([`crate::parts`]: the inputs of a compaction disappear from listings in
//! the same step as its merged file appears), and passes everything else through.
//!
//! Every DataFusion reader of the warehouse (`herald sql`, the stats aggregator,
//! reconciliation) registers it through [`crate::Warehouse::register_store`]; DataFusion finds
//! a listing table's files only through the store's listings, so it never reads a compaction's
//! inputs beside its output.

use crate::parts::retain_visible;
use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use std::fmt;
use std::sync::Arc;

/// `inner` with compacted-away files left out of its listings.
#[derive(Debug)]
pub(crate) struct CompactedView {
    inner: Arc<dyn ObjectStore>,
}

impl CompactedView {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CompactedView { inner }
    }
}

impl fmt::Display for CompactedView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompactedView({})", self.inner)
    }
}

/// Splits an object's location into its directory and file name.
fn dir_and_name(meta: &ObjectMeta) -> (&str, &str) {
    meta.location.as_ref().rsplit_once('/').unwrap_or(("", ""))
}

#[async_trait]
impl ObjectStore for CompactedView {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    /// The whole listing is needed to tell which files are hidden, so it is collected first.
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let listing = self.inner.list(prefix);
        stream::once(async move {
            let mut metas: Vec<ObjectMeta> = listing.try_collect().await?;
            retain_visible(&mut metas, dir_and_name);
            Ok::<_, object_store::Error>(stream::iter(
                metas.into_iter().map(Ok::<_, object_store::Error>),
            ))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        retain_visible(&mut listed.objects, dir_and_name);
        Ok(listed)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
