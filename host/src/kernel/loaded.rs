//! [`Loaded`]: one version of a service as the kernel holds it, opened in this process or
//! prepared to run in worker processes; and [`KernelInner::load_version`], which decides
//! which.

use std::{path::Path, sync::Arc};

use super::KernelInner;
use crate::{
    instance::InstanceSource,
    loader::{Library, LoadError, Manifest, PluginFile},
    worker::{self, IsolatedPlugin},
};

/// One loaded version of a service.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// A library opened in the host.
    InProcess(Arc<Library>),
    /// A file whose instances run in worker processes; the host never opened it.
    Isolated(Arc<IsolatedPlugin>),
}

impl From<Library> for Loaded {
    fn from(library: Library) -> Self {
        Loaded::InProcess(Arc::new(library))
    }
}

impl From<IsolatedPlugin> for Loaded {
    fn from(plugin: IsolatedPlugin) -> Self {
        Loaded::Isolated(Arc::new(plugin))
    }
}

impl Loaded {
    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        match self {
            Loaded::InProcess(library) => library.manifest(),
            Loaded::Isolated(plugin) => plugin.manifest(),
        }
    }

    /// The plugin file.
    pub fn path(&self) -> &Path {
        match self {
            Loaded::InProcess(library) => library.path(),
            Loaded::Isolated(plugin) => plugin.path(),
        }
    }

    /// The SHA-256 of the file's content.
    pub fn sha256(&self) -> &[u8; 32] {
        match self {
            Loaded::InProcess(library) => library.sha256(),
            Loaded::Isolated(plugin) => plugin.sha256(),
        }
    }

    /// Whether its instances run in worker processes.
    pub fn is_isolated(&self) -> bool {
        matches!(self, Loaded::Isolated(_))
    }

    /// What makes its instances.
    pub(super) fn source(&self) -> Arc<dyn InstanceSource> {
        match self {
            Loaded::InProcess(library) => library.clone(),
            Loaded::Isolated(plugin) => plugin.clone(),
        }
    }
}

impl KernelInner {
    /// Loads a plugin file in the mode its service is configured for. The probe proves it
    /// in a child process, as it does every file, and says which service it provides;
    /// without a probe (and only when some service is isolated) a worker process reads its
    /// manifest instead. A file of an isolated service is then never opened in the host;
    /// the others are opened here.
    ///
    /// # Safety
    ///
    /// As for [`crate::loader::Loader::load`]: the caller vouches for the file.
    pub(super) unsafe fn load_version(&self, file: &PluginFile) -> Result<Loaded, LoadError> {
        let loader = &self.loader;
        let copy = loader.copy(file)?;
        let probed = loader.prove(&copy)?;
        let isolation = self
            .isolation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let (Some(program), false) = (&self.config.worker_program, isolation.is_empty()) {
            let manifest = match probed {
                Some(manifest) => manifest,
                None => worker::read_manifest(program, &copy, self.config.operation_timeout)?,
            };
            if let Some(settings) = isolation.get(&manifest.name) {
                return Ok(IsolatedPlugin::new(
                    copy,
                    manifest,
                    program.clone(),
                    settings.clone(),
                    self.config.operation_timeout,
                    self.config.spin,
                )
                .into());
            }
        }
        // SAFETY: the caller vouches for the file.
        Ok(unsafe { loader.open_copy(copy) }?.into())
    }
}
