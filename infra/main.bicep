// tunedrop on Azure: Function App (Flex Consumption), storage, monitoring, identity and roles,
// Key Vault, Event Grid system topics, and the Azure ML workspace (existing, or created when asked).
//
// The two Event Grid *subscriptions* are in eventgrid.bicep, deployed by azure.yaml's postdeploy
// hook: both point at functions (the blob extension webhook and the job_events function), and Event
// Grid validates an endpoint when the subscription is created, so the code must be deployed first.
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('azd environment name; seeds resource names and the azd-env-name tag.')
param environmentName string

@description('Region for everything except a workspace referenced as existing (its system topic follows the workspace).')
param location string = resourceGroup().location

@description('Create a new Azure ML workspace (with its storage, Key Vault and a GPU cluster) instead of using an existing one.')
param createWorkspace bool = false

@description('Name of the Azure ML workspace: the existing one to use (createWorkspace=false, required then) or the one to create (empty: mlw-<token>).')
param workspaceName string = ''

@description('Resource group of an existing workspace. Empty: this resource group. Ignored when createWorkspace=true.')
param workspaceResourceGroup string = ''

@description('Name of the Event Grid system topic that already exists on the workspace, if any (a resource has at most one; it is updated in place with a system identity for dead-lettering). Empty: create one.')
param existingWorkspaceSystemTopicName string = ''

@description('GPU cluster of the fine-tune step (TUNEDROP_AZUREML_FINETUNE_COMPUTE): created with this name when createWorkspace=true, else it must exist in the workspace.')
param computeName string = 'gpu-cluster'

@description('VM size of the online deployment (TUNEDROP_AZUREML_INSTANCE_TYPE); needs quota and must be in the model\'s inference_compute_allow_list.')
param deploymentInstanceType string = 'Standard_NC24ads_A100_v4'

@description('Created workspace only: GPU cluster VM size (check the model\'s finetune_compute_allow_list and your quota).')
param gpuClusterVmSize string = 'Standard_NC24ads_A100_v4'

@description('Created workspace only: the most nodes the GPU cluster scales to (it scales to 0 when idle).')
@minValue(1)
param gpuClusterMaxNodes int = 1

@description('Comma-separated URLs that receive run webhooks (TUNEDROP_WEBHOOK_URLS). Empty: no webhooks.')
param webhookUrls string = ''

@description('Keys of the OpenAI-compatible routes (TUNEDROP_API_KEYS): comma-separated name:sha256 entries from `tunedrop keys new NAME`. Hashes, not keys: not secret. Empty: /api/v1 answers 401.')
param apiKeys string = ''

@secure()
@description('Standard Webhooks signing secret (whsec_...), stored in Key Vault and read through a Key Vault reference. Required when webhookUrls is set.')
param webhookSecret string = ''

@description('Foundation model to fine-tune (TUNEDROP_BASE_MODEL). Empty: Phi-3-mini-4k-instruct.')
param baseModel string = ''

@description('NCRONTAB schedule of the sweeper (TUNEDROP_SWEEP_SCHEDULE).')
param sweepSchedule string = '0 */5 * * * *'

@description('Extra or overriding app settings merged last, e.g. {"TUNEDROP_IDLE_MINUTES": "60"}; also the place for settings the Bicep cannot know in advance.')
param appSettingOverrides object = {}

@description('Function App instance memory in MB (Flex Consumption: 512, 2048 or 4096).')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@description('Most instances the Function App scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Existing workspace only: object id of the managed identity the fine-tune cluster (computeName) runs as, which reads each run\'s data through the datastore; it gets Storage Blob Data Reader on the finetune-data container. Empty: grant it yourself (infra/README.md). A created workspace\'s cluster is granted automatically.')
param computePrincipalId string = ''

@description('Object id of a user or group that also gets data access to the data account (to drop datasets with az/azcopy). Empty: none.')
param userPrincipalId string = ''

@description('Log Analytics retention in days.')
@minValue(30)
param logRetentionDays int = 30

// Names the app uses (they match shared/settings.py defaults; tests/test_infra.py checks).
var trainingContainer = 'training-data'
var quarantineContainer = 'quarantine'
var deadLetterContainer = 'eventgrid-deadletter'
var runsTable = 'runs'
var dataContainer = 'finetune-data'
var datastoreName = 'tunedrop'
var webhookQueue = 'webhooks'
var jobEventsQueue = 'job-events'

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = { 'azd-env-name': environmentName, app: 'tunedrop' }
var functionAppName = 'func-tunedrop-${token}'
var dataAccountName = take('sttddata${token}', 24)
var hostAccountName = take('sttdhost${token}', 24)
var wsName = !empty(workspaceName) ? workspaceName : 'mlw-tunedrop-${token}'
var wsResourceGroup = createWorkspace || empty(workspaceResourceGroup) ? resourceGroup().name : workspaceResourceGroup

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-tunedrop-${token}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    tags: tags
    token: token
    retentionInDays: logRetentionDays
    principalId: identity.properties.principalId
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    tags: tags
    dataAccountName: dataAccountName
    hostAccountName: hostAccountName
    functionAppName: functionAppName
    trainingContainer: trainingContainer
    quarantineContainer: quarantineContainer
    deadLetterContainer: deadLetterContainer
    dataContainer: dataContainer
    runsTable: runsTable
    webhookQueue: webhookQueue
    jobEventsQueue: jobEventsQueue
    principalId: identity.properties.principalId
    userPrincipalId: userPrincipalId
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    tags: tags
    token: token
    principalId: identity.properties.principalId
    webhookSecret: webhookSecret
  }
}

module workspace 'modules/workspace.bicep' = {
  name: 'workspace'
  scope: resourceGroup(wsResourceGroup)
  params: {
    create: createWorkspace
    name: wsName
    location: location
    tags: tags
    token: token
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    gpuClusterVmSize: gpuClusterVmSize
    gpuClusterMaxNodes: gpuClusterMaxNodes
    gpuClusterName: computeName
    principalId: identity.properties.principalId
    systemTopicName: !empty(existingWorkspaceSystemTopicName) ? existingWorkspaceSystemTopicName : 'evgt-tunedrop-mlw-${token}'
  }
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: functionAppName
    location: location
    tags: tags
    identityId: identity.id
    identityClientId: identity.properties.clientId
    hostStorageAccountName: storage.outputs.hostAccountName
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    dataBlobEndpoint: storage.outputs.dataBlobEndpoint
    dataQueueEndpoint: storage.outputs.dataQueueEndpoint
    dataTableEndpoint: storage.outputs.dataTableEndpoint
    appInsightsConnectionString: monitoring.outputs.connectionString
    webhookSecretUri: vault.outputs.webhookSecretUri
    webhookUrls: webhookUrls
    apiKeys: apiKeys
    baseModel: baseModel
    workspaceId: workspace.outputs.id
    computeName: computeName
    dataContainer: dataContainer
    datastoreName: datastoreName
    deploymentInstanceType: deploymentInstanceType
    sweepSchedule: sweepSchedule
    trainingContainer: trainingContainer
    quarantineContainer: quarantineContainer
    runsTable: runsTable
    webhookQueue: webhookQueue
    jobEventsQueue: jobEventsQueue
    appSettingOverrides: appSettingOverrides
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
  }
}

// Event Grid system topic on the data account; the subscription (to the blob extension webhook)
// is in eventgrid.bicep. Its identity writes undeliverable events to the dead-letter container.
resource dataAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: dataAccountName
}

resource storageTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: 'evgt-tunedrop-st-${token}'
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    source: dataAccount.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
  dependsOn: [storage]
}

module deadLetterRoles 'modules/deadletter-roles.bicep' = {
  name: 'deadletter-roles'
  params: {
    dataAccountName: storage.outputs.dataAccountName
    deadLetterContainer: deadLetterContainer
    principalIds: [storageTopic.identity.principalId, workspace.outputs.systemTopicPrincipalId]
  }
}

// The identity datastore the fine-tune job reads each run's split through (TUNEDROP_AZUREML_DATASTORE),
// on the data account's finetune-data container, in a created or an existing workspace.
module datastore 'modules/workspace-datastore.bicep' = {
  name: 'workspace-datastore'
  scope: resourceGroup(wsResourceGroup)
  params: {
    workspaceName: workspace.outputs.name
    name: datastoreName
    dataAccountName: storage.outputs.dataAccountName
    container: dataContainer
    dataSubscriptionId: subscription().subscriptionId
    dataResourceGroup: resourceGroup().name
  }
}

// The job reads through the datastore with the compute cluster's managed identity (see
// modules/workspace-datastore.bicep): the created GPU cluster's, or the one given for an existing workspace.
module clusterReader 'modules/data-reader.bicep' = if (createWorkspace) {
  name: 'cluster-data-reader'
  params: {
    dataAccountName: dataAccountName
    container: dataContainer
    principalId: workspace.outputs.gpuClusterPrincipalId
  }
  dependsOn: [storage]
}

module existingClusterReader 'modules/data-reader.bicep' = if (!createWorkspace && !empty(computePrincipalId)) {
  name: 'existing-cluster-data-reader'
  params: {
    dataAccountName: dataAccountName
    container: dataContainer
    principalId: computePrincipalId
  }
  dependsOn: [storage]
}

// Read by azd (it sets each as an azd environment value) and by the postdeploy hook and the CLI.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output TUNEDROP_API_URL string = 'https://${app.outputs.defaultHostName}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.dataAccountName
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.dataBlobEndpoint
output TUNEDROP_TRAINING_CONTAINER string = trainingContainer
output TUNEDROP_AZUREML_DATA_CONTAINER string = dataContainer
output AZURE_STORAGE_SYSTEM_TOPIC_NAME string = storageTopic.name
output AZURE_EVENTGRID_DEADLETTER_CONTAINER string = deadLetterContainer
output AZURE_ML_WORKSPACE_ID string = workspace.outputs.id
output AZURE_ML_WORKSPACE_NAME string = workspace.outputs.name
output AZURE_ML_RESOURCE_GROUP string = wsResourceGroup
output AZURE_ML_SYSTEM_TOPIC_NAME string = workspace.outputs.systemTopicName
output AZURE_ML_GPU_CLUSTER_NAME string = computeName
output TUNEDROP_AZUREML_DATASTORE string = datastore.outputs.name
output AZURE_KEY_VAULT_NAME string = vault.outputs.name
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.properties.clientId
output AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID string = identity.properties.principalId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
