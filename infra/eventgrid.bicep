// The Event Grid subscriptions that feed the Function App. Deployed by azure.yaml's postdeploy
// hook (infra/scripts/postdeploy.sh), after `azd deploy`: Event Grid validates an endpoint when a
// subscription is created, and the blob extension's system key (blobs_extension) and the
// job_events function only exist once the code runs. Re-running it is harmless (same names).
//
// - blob created in training-data -> the ingest function's Event Grid-sourced blob trigger, through
//   the blob extension webhook (the only blob trigger Flex Consumption runs);
// - Azure ML run events -> the job_events Event Grid trigger, as endpoint type AzureFunction (Event
//   Grid fetches the function's key itself and adapts its delivery rate; no key in the template).
//   RunCompleted carries no runStatus, so it has its own subscription; RunStatusChanged is
//   filtered to the statuses shared/pipeline.py acts on: Running (run.running) and the failures.
//
// Both retry for a day and dead-letter into the data account with the system topic's identity.
targetScope = 'resourceGroup'

@description('Name of the Function App (output AZURE_FUNCTION_APP_NAME of main.bicep).')
param functionAppName string

@description('Name of the data account\'s Event Grid system topic (output AZURE_STORAGE_SYSTEM_TOPIC_NAME).')
param storageSystemTopicName string

@description('Name of the data storage account, where undeliverable events are dead-lettered (output AZURE_STORAGE_ACCOUNT_NAME).')
param storageAccountName string

@description('Dead-letter container in the data account (output AZURE_EVENTGRID_DEADLETTER_CONTAINER).')
param deadLetterContainer string = 'eventgrid-deadletter'

@description('Container users drop datasets into (output TUNEDROP_TRAINING_CONTAINER).')
param trainingContainer string = 'training-data'

@description('Resource group of the workspace and its system topic (output AZURE_ML_RESOURCE_GROUP).')
param workspaceResourceGroup string = resourceGroup().name

@description('Name of the workspace\'s Event Grid system topic (output AZURE_ML_SYSTEM_TOPIC_NAME).')
param workspaceSystemTopicName string

@description('Delivery attempts before an event is dead-lettered.')
@minValue(1)
@maxValue(30)
param maxDeliveryAttempts int = 30

@description('Minutes an event is retried before it is dead-lettered (1440: Event Grid\'s maximum, a day).')
@minValue(1)
@maxValue(1440)
param eventTimeToLiveInMinutes int = 1440

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource storageTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: storageSystemTopicName
}

var retryPolicy = {
  maxDeliveryAttempts: maxDeliveryAttempts
  eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
}
var deadLetter = {
  identity: { type: 'SystemAssigned' }
  deadLetterDestination: {
    endpointType: 'StorageBlob'
    properties: {
      resourceId: resourceId('Microsoft.Storage/storageAccounts', storageAccountName)
      blobContainerName: deadLetterContainer
    }
  }
}

// Blob created in the training container -> ingest (blob extension webhook + its system key).
resource blobCreated 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: storageTopic
  name: 'tunedrop-ingest'
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${site.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.ingest&code=${listKeys('${site.id}/host/default', '2024-04-01').systemKeys.blobs_extension}'
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: ['Microsoft.Storage.BlobCreated']
      subjectBeginsWith: '/blobServices/default/containers/${trainingContainer}/blobs/'
    }
    retryPolicy: retryPolicy
    deadLetterWithResourceIdentity: deadLetter
  }
}

module runEvents 'modules/workspace-subscriptions.bicep' = {
  name: 'workspace-subscriptions'
  scope: resourceGroup(workspaceResourceGroup)
  params: {
    systemTopicName: workspaceSystemTopicName
    functionResourceId: '${site.id}/functions/job_events'
    retryPolicy: retryPolicy
    deadLetter: deadLetter
  }
}

output blobSubscriptionId string = blobCreated.id
