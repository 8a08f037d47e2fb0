// Storage Blob Data Reader on one container of the data account (Azure ML compute reading the
// train/test splits the app writes there).
@description('Name of the data storage account.')
param dataAccountName string
@description('Container to read.')
param container string
@description('Principal id of the reader (a compute cluster\'s managed identity).')
param principalId string

var blobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'

resource data 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
  resource blobs 'blobServices' existing = {
    name: 'default'
    resource target 'containers' existing = { name: container }
  }
}

resource reader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(data::blobs::target.id, principalId, blobDataReader)
  scope: data::blobs::target
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataReader)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
