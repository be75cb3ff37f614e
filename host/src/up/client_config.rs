//! Files the guest hands over for the user's tools: the gateway's client credentials and the
//! cluster's kubeconfig. Storing them is never the end of a boot: a failure is an error line.

use crate::progress::Progress;

/// Keeps the guest's client bundle where the user's tools find it; a failure is reported, not
/// fatal (the gateway runs without it, only the CLI cannot connect).
pub fn store_credentials(
    instance: &str,
    (ca, cert, key): (&str, &str, &str),
    gateway_port: Option<u16>,
    progress: &Progress,
) {
    use crate::credentials::{gateway_dir, store, Stored};
    let result = gateway_dir(instance)
        .and_then(|dir| store(&dir, ca, cert, key, gateway_port).map(|stored| (dir, stored)));
    match result {
        Ok((dir, Stored::New)) => {
            progress.note(&format!("client credentials stored in {}", dir.display()))
        }
        Ok((_, Stored::Unchanged)) => {}
        Ok((dir, Stored::Replaced { old, new })) => {
            progress.error(&crate::credentials::replaced_warning(&dir, &old, &new))
        }
        Err(e) => progress.error(&format!("client credentials not stored: {e}")),
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
