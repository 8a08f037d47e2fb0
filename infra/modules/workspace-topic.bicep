// Event Grid system topic on the Azure ML workspace, with a system identity for dead-lettering.
param name string
@description('The workspace\'s region (a system topic lives where its source does).')
param location string
param tags object
param workspaceId string

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    source: workspaceId
    topicType: 'Microsoft.MachineLearningServices.Workspaces'
  }
}

output principalId string = topic.identity.principalId
