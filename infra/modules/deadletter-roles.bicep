// Event Grid system topics deliver undeliverable events to the dead-letter container with their
// own managed identity (the account has no shared key): Storage Blob Data Contributor on that
// container only.
param dataAccountName string
param deadLetterContainer string
@description('Principal ids of the system topics\' identities.')
param principalIds array

var blobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource data 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
  resource blobs 'blobServices' existing = {
    name: 'default'
    resource container 'containers' existing = { name: deadLetterContainer }
  }
}

resource writers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in principalIds: {
  name: guid(data::blobs::container.id, principalId, blobDataContributor)
  scope: data::blobs::container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]
