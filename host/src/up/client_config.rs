//! Files the guest hands over for the user's tools: the gateway's client credentials (with the
//! gateway's registration and, once healthy, its activation for the OpenShell CLI) and the
//! cluster's kubeconfig. Storing them is never the end of a boot: a failure is an error line.

use crate::gateway_health::ClientBundle;
use crate::gateway_metadata::GatewayMetadata;
use crate::progress::Progress;

/// Keeps the guest's client bundle where the user's tools find it and, when the gateway port is
/// forwarded, the gateway's registration for the OpenShell CLI. A failure is reported, not fatal
/// (the gateway runs without it, only the CLI cannot connect). Returns the bundle once it passed
/// its checks, stored or not: the host's health probe uses it.
pub fn store_credentials(
    instance: &str,
    (ca, cert, key): (&str, &str, &str),
    gateway_port: Option<u16>,
    progress: &Progress,
) -> Option<ClientBundle> {
    use crate::credentials::{gateway_dir, gateway_name, store, Stored};
    if let Some(w) = crate::credentials::validity_warning(ca, std::time::SystemTime::now()) {
        progress.error(&w);
    }
    let result = gateway_dir(instance)
        .and_then(|dir| store(&dir, ca, cert, key).map(|stored| (dir, stored)));
    let dir = match result {
        Ok((dir, Stored::New)) => {
            progress.note(&format!("client credentials stored in {}", dir.display()));
            dir
        }
        Ok((dir, Stored::Unchanged)) => dir,
        Ok((dir, Stored::Replaced { old, new })) => {
            progress.error(&crate::credentials::replaced_warning(&dir, &old, &new));
            dir
        }
        Err(e) => {
            progress.error(&format!("client credentials not stored: {e}"));
            // A sound bundle with nowhere to go still lets the host ask the gateway.
            return (!e.refused()).then(|| bundle(ca, cert, key));
        }
    };
    if let Some(port) = gateway_port {
        let meta = GatewayMetadata::local(&gateway_name(instance), port);
        if let Err(e) = crate::gateway_metadata::store(&dir, &meta) {
            progress.error(&format!("gateway metadata not stored: {e}"));
        }
    }
    Some(bundle(ca, cert, key))
}

fn bundle(ca: &str, cert: &str, key: &str) -> ClientBundle {
    ClientBundle {
        ca: ca.to_string(),
        cert: cert.to_string(),
        key: key.to_string(),
    }
}

/// Makes this gateway the OpenShell CLI's active one, once it is healthy; a failure is an error
/// line (the CLI can still be pointed at it by name).
pub fn activate(instance: &str, progress: &Progress) {
    let name = crate::credentials::gateway_name(instance);
    match crate::gateway_metadata::openshell_dir()
        .and_then(|dir| crate::gateway_metadata::activate(&dir, &name).map(|c| (dir, c)))
    {
        Ok((dir, true)) => progress.note(&format!(
            "{name} is now the OpenShell CLI's active gateway ({})",
            dir.join("active_gateway").display()
        )),
        Ok((_, false)) => {}
        Err(e) => progress.error(&format!("{name} not made the active gateway: {e}")),
    }
}

/// Writes the cluster's kubeconfig for the user; a refused or unwritable one is an error line,
/// not the end of the boot (the gateway itself works without it).
pub fn store_kubeconfig(instance: &str, yaml: &str, api_forward: Option<u16>, progress: &Progress) {
    use crate::kubeconfig::{path, store, Written, API_PORT};
    let result =
        path(instance).and_then(|p| store(&p, yaml, instance, api_forward).map(|w| (p, w)));
    match result {
        Ok((p, written)) => {
            if written != Written::Unchanged {
                progress.note(&format!("kubeconfig written to {}", p.display()));
            }
            if api_forward.is_none() {
                progress.note(&format!(
                    "the API port {API_PORT} is not forwarded: {} reaches the cluster only with `-p {API_PORT}:{API_PORT}`",
                    p.display()
                ));
            }
        }
        Err(e) => progress.error(&format!("kubeconfig not written: {e}")),
    }
}
