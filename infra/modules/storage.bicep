// Two storage accounts, both Entra ID only (shared key off), TLS 1.2, no public blob access:
// - host: AzureWebJobsStorage (keys, timer locks) and the Flex Consumption deployment package;
// - data: what users and the app touch (datasets, quarantine, runs table, webhook outbox) and the
//   Event Grid dead-letter container. It is the source of the blob-created system topic.
param location string
param tags object
param dataAccountName string
param hostAccountName string
param functionAppName string
param trainingContainer string
param quarantineContainer string
param deadLetterContainer string
@description('Container the Azure ML backend writes each run\'s train/test split to (read by jobs through an identity datastore).')
param dataContainer string
param runsTable string
param webhookQueue string
@description('Queue between the job_events Event Grid trigger and job_event_worker.')
param jobEventsQueue string
@description('Principal id of the Function App identity.')
param principalId string
@description('Optional user or group object id that may drop datasets (Storage Blob Data Contributor on the data account).')
param userPrincipalId string = ''

var roles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  blobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}
var deploymentContainer = 'app-package-${take(functionAppName, 32)}'

var accountProperties = {
  accessTier: 'Hot'
  allowBlobPublicAccess: false
  allowSharedKeyAccess: false
  allowCrossTenantReplication: false
  defaultToOAuthAuthentication: true
  minimumTlsVersion: 'TLS1_2'
  supportsHttpsTrafficOnly: true
  publicNetworkAccess: 'Enabled'
  networkAcls: {
    bypass: 'AzureServices'
    defaultAction: 'Allow'
  }
  encryption: {
    requireInfrastructureEncryption: true
    keySource: 'Microsoft.Storage'
    services: {
      blob: { enabled: true, keyType: 'Account' }
      file: { enabled: true, keyType: 'Account' }
      queue: { enabled: true, keyType: 'Account' }
      table: { enabled: true, keyType: 'Account' }
    }
  }
}

resource data 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration reaches storage from shared public outbound addresses; a deny-by-default firewall would lock the app out. Access needs Entra ID (shared key is off).
  // checkov:skip=CKV_AZURE_59: same reason: public endpoint stays enabled, every request is authorised by Entra ID RBAC.
  // checkov:skip=CKV_AZURE_33: queue service classic logging needs shared-key-era Storage Analytics; use diagnostic settings to Log Analytics instead.
  // checkov:skip=CKV_AZURE_206: LRS (three copies in one datacenter) by choice: datasets can be uploaded again and the models live in Azure ML; GRS doubles the storage cost.
  // checkov:skip=CKV_AZURE_43: the name is computed (take('sttddata' + uniqueString(...), 24): lowercase letters and digits, at most 24), which checkov cannot evaluate.
  name: dataAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: accountProperties

  resource blobs 'blobServices' = {
    name: 'default'
    properties: {
      deleteRetentionPolicy: { enabled: true, days: 7 }
      containerDeleteRetentionPolicy: { enabled: true, days: 7 }
    }
    resource training 'containers' = { name: trainingContainer, properties: { publicAccess: 'None' } }
    resource quarantine 'containers' = { name: quarantineContainer, properties: { publicAccess: 'None' } }
    resource finetuneData 'containers' = { name: dataContainer, properties: { publicAccess: 'None' } }
    resource deadLetter 'containers' = { name: deadLetterContainer, properties: { publicAccess: 'None' } }
  }
  resource queues 'queueServices' = {
    name: 'default'
    resource outbox 'queues' = { name: webhookQueue }
    resource poison 'queues' = { name: '${webhookQueue}-poison' }
    resource jobEvents 'queues' = { name: jobEventsQueue }
    resource jobEventsPoison 'queues' = { name: '${jobEventsQueue}-poison' }
  }
  resource tables 'tableServices' = {
    name: 'default'
    resource runs 'tables' = { name: runsTable }
  }
}

resource host 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: see the data account: Flex Consumption without VNet integration needs the public endpoint; Entra ID only.
  // checkov:skip=CKV_AZURE_59: see the data account.
  // checkov:skip=CKV_AZURE_33: see the data account.
  // checkov:skip=CKV_AZURE_206: host storage holds only re-creatable state (deployment package, host keys, timer locks).
  // checkov:skip=CKV_AZURE_43: computed name (see the data account).
  name: hostAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: accountProperties

  resource blobs 'blobServices' = {
    name: 'default'
    resource deployment 'containers' = { name: deploymentContainer, properties: { publicAccess: 'None' } }
  }
}

// Function App identity on the data account: blobs (read datasets, move them to quarantine, set
// metadata; Owner because the Functions blob extension's Event Grid trigger needs it), the
// webhook queue and its poison queue, the runs table.
var dataRoles = [roles.blobDataOwner, roles.queueDataContributor, roles.tableDataContributor]
resource appDataRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in dataRoles: {
  name: guid(data.id, principalId, role)
  scope: data
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

// Host account (AzureWebJobsStorage): blobs for host keys, timer locks and the deployment package;
// queues because the blob trigger with source EventGrid writes each event to a queue here before
// the function runs (without Queue Data Contributor its webhook answers 403 and nothing is ingested).
var hostRoles = [roles.blobDataOwner, roles.queueDataContributor]
resource appHostRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in hostRoles: {
  name: guid(host.id, principalId, role)
  scope: host
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

resource userDataRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(data.id, userPrincipalId, roles.blobDataContributor)
  scope: data
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataContributor)
    principalId: userPrincipalId
  }
}

output dataAccountName string = data.name
output dataAccountId string = data.id
output hostAccountName string = host.name
output dataBlobEndpoint string = data.properties.primaryEndpoints.blob
output dataQueueEndpoint string = data.properties.primaryEndpoints.queue
output dataTableEndpoint string = data.properties.primaryEndpoints.table
output deploymentContainerUrl string = '${host.properties.primaryEndpoints.blob}${deploymentContainer}'
