// One Key Vault secret (a module so that it can be conditional and still fully checked).
param vaultName string
param name string
@secure()
param value string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: a webhook signing secret is rotated by the operator together with the receivers, not expired by date: an expiry would silently stop webhooks.
  parent: vault
  name: name
  properties: {
    value: value
    contentType: 'text/plain; Standard Webhooks secret (whsec_)'
  }
}
