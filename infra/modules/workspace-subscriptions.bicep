// Azure ML run events -> the job_events function (see eventgrid.bicep). Deployed into the
// workspace's resource group, where its system topic is.
param systemTopicName string
@description('Resource id of the job_events function: <function app id>/functions/job_events.')
param functionResourceId string
param retryPolicy object
param deadLetter object

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

var destination = {
  endpointType: 'AzureFunction'
  properties: {
    resourceId: functionResourceId
    maxEventsPerBatch: 1
    preferredBatchSizeInKilobytes: 64
  }
}

// A pipeline job that succeeded: register the model, start the deployment.
resource completed 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'tunedrop-run-completed'
  properties: {
    destination: destination
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: ['Microsoft.MachineLearningServices.RunCompleted']
    }
    retryPolicy: retryPolicy
    deadLetterWithResourceIdentity: deadLetter
  }
}

// Status changes the app acts on: Running (run.running) and the failures (run.failed). Every
// other status (Queued, Preparing, Finalizing, ...) would only cost deliveries. Microsoft's sample
// event says "failed": Event Grid's advanced filters compare strings case-insensitively ("All string
// comparisons aren't case-sensitive", Event Grid's event-filtering doc), and the app reads it in any case.
resource statusChanged 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'tunedrop-run-status'
  properties: {
    destination: destination
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: ['Microsoft.MachineLearningServices.RunStatusChanged']
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.runStatus'
          values: ['Running', 'Failed', 'Canceled']
        }
      ]
    }
    retryPolicy: retryPolicy
    deadLetterWithResourceIdentity: deadLetter
  }
}
