// Key Vault (RBAC authorisation) holding the webhook signing secret; the Function App reads it
// through a Key Vault reference with its user-assigned identity (Key Vault Secrets User).
param location string
param tags object
param token string
@description('Principal id of the Function App identity.')
param principalId string
@secure()
@description('Standard Webhooks signing secret; empty: no secret is stored and the app setting stays empty.')
param webhookSecret string

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: the Flex Consumption app without VNet integration resolves Key Vault references over the public endpoint; a deny-by-default firewall would break them. Access is RBAC only.
  // checkov:skip=CKV_AZURE_189: same reason: public network access must stay enabled for the app without VNet integration.
  name: take('kv-tunedrop-${token}', 24)
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

module secret 'keyvault-secret.bicep' = if (!empty(webhookSecret)) {
  name: 'webhook-secret'
  params: {
    vaultName: vault.name
    name: 'tunedrop-webhook-secret'
    value: webhookSecret
  }
}

resource reader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output name string = vault.name
@description('Versionless secret URI (the reference follows rotations), or empty when no secret was given.')
output webhookSecretUri string = empty(webhookSecret) ? '' : '${vault.properties.vaultUri}secrets/tunedrop-webhook-secret'
