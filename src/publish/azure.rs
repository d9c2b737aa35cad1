//! The Azure Blob client for a target (a static website's `$web` container, or any), with
//! credentials resolved here so that a missing one is named.

use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::bucket::{env, one_line};
use super::connector::PublicRoots;
use super::target::{AzureCredentials, PublishTarget};

/// The target's container. With an `endpoint`, blobs are at `endpoint/container/key` (path
/// style, as Azurite and Azure Stack serve them); without, at
/// `https://<account>.blob.core.windows.net/container/key`.
pub(super) fn open(
    target: &PublishTarget,
    account: Option<&str>,
    credentials: &AzureCredentials,
    options: ClientOptions,
    retry: RetryConfig,
    connector: PublicRoots,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let to = &target.to;
    let Some(account) = account
        .map(str::to_owned)
        .or_else(|| env("AZURE_STORAGE_ACCOUNT_NAME"))
    else {
        bail!("{to}: no storage account: set account in the target, or AZURE_STORAGE_ACCOUNT_NAME");
    };
    let mut builder = MicrosoftAzureBuilder::new()
        .with_http_connector(connector)
        .with_account(account)
        .with_container_name(&target.bucket)
        .with_retry(retry)
        .with_client_options(options);
    if let Some(endpoint) = &target.endpoint {
        builder = builder.with_endpoint(endpoint.as_str().trim_end_matches('/').to_owned());
    }
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .with_context(|| format!("{to}: cannot read {what} {}", path.display()))
    };
    builder = match credentials {
        AzureCredentials::AccountKeyFile(path) => {
            builder.with_access_key(read("account_key_file", path)?)
        }
        AzureCredentials::SasTokenFile(path) => builder.with_config(
            AzureConfigKey::SasKey,
            read("sas_token_file", path)?.trim_start_matches('?'),
        ),
        AzureCredentials::Environment => {
            let key = env("AZURE_STORAGE_ACCOUNT_KEY").or_else(|| env("AZURE_STORAGE_ACCESS_KEY"));
            if let Some(key) = key {
                builder.with_access_key(key)
            } else if let Some(sas) = env("AZURE_STORAGE_SAS_TOKEN") {
                builder.with_config(AzureConfigKey::SasKey, sas.trim_start_matches('?'))
            } else if let (Some(client), Some(tenant), Some(token)) = (
                env("AZURE_CLIENT_ID"),
                env("AZURE_TENANT_ID"),
                env("AZURE_FEDERATED_TOKEN_FILE"),
            ) {
                // Workload identity, as the AKS webhook injects it.
                let builder = builder
                    .with_client_id(client)
                    .with_tenant_id(tenant)
                    .with_federated_token_file(token);
                match env("AZURE_AUTHORITY_HOST") {
                    Some(host) => builder.with_authority_host(host),
                    None => builder,
                }
            } else {
                bail!(
                    "{to}: no credentials: set account_key_file or sas_token_file in the target, \
                     or AZURE_STORAGE_ACCOUNT_KEY, or AZURE_STORAGE_SAS_TOKEN, or AZURE_CLIENT_ID, \
                     AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE in the environment (the \
                     instance metadata service is never asked)"
                );
            }
        }
    };
    let store = builder
        .build()
        .map_err(|e| anyhow!("{to}: {}", one_line(&e.to_string())))?;
    Ok(Arc::new(store))
}
